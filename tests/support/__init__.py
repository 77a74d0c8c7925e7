"""What test modules of different layers share."""
