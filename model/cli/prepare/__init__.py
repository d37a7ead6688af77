"""``python -m model.cli.prepare <source>``: one sub-command per converter of
model/data/prepare/ (and the tar-shard writer of model/data/shards.py)."""
