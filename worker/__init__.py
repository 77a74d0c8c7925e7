"""The worker: arq settings, job functions, the streaming pipeline and the engines."""
