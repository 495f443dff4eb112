"""Data pipelines: sentencepiece tokenizer, Ray Data tokenize/pack/shard with a manifest, shard
readers for training, and Long Range Arena task data. Imports nothing from `launcher`."""

__version__ = "0.1.0"
