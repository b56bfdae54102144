"""Checkpoints: the allow-listed unpickler (``unpickler``), safe and read-once loading (``loading``), the checks
and overrides a loaded checkpoint's Config gets (``checks``, ``overrides``), the pickle-free format
(``format``), lineage (``lineage``)."""
