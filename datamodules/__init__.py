"""Data: corpus synthesis, shards, features, datamodules."""
