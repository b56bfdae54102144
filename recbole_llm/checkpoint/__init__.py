"""Checkpoints: the allow-listed unpickler, safe and read-once loading, the pickle-free format, lineage."""
