"""Where backups live.

- `base`: the BackupStore contract every destination implements, and `open_store`;
- `local`: a directory on a local or mounted disk;
- `s3`: an S3 bucket (any S3-compatible service);
- `catalog`: a target's destinations together — one backup written to all at once, listed
  and found again across them.

A new destination type implements `base.BackupStore` in a module here and gets one branch
in `open_store`.
"""
