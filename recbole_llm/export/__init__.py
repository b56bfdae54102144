"""ONNX export: from a RecBole checkpoint to a validated, optimized, self-contained artifact.

    recbole-llm export --checkpoint saved/BERTLoRA-....pth --output artifacts/bertlora [--top-k 10]
        [--opset 17] [--optimize] [--int8 | --fp16] [--triton] [--force]

Following optimum's exporter (export, then run the runtime against the framework on the same inputs and
fail loudly past a tolerance), one module per step:

- :mod:`recbole_llm.artifact`: the contract (file names, graph inputs and outputs, metadata schema,
  numpy post-processing, files and their signature) that every other step and the runtime use. numpy only.
- :mod:`~recbole_llm.export.options`: what to export and where, checked before anything heavy loads.
- :mod:`~recbole_llm.export.graph`: the scoring graph (the model's ``export_scores`` hook, then top-K with
  exclusions) and its trace, with dynamic batch and length checked in the saved graph.
- :mod:`~recbole_llm.export.validate`: ONNX Runtime against PyTorch on real test histories of mixed
  lengths; typed errors (:class:`ValidationFailed` and its kinds).
- :mod:`~recbole_llm.export.optimize`: ONNX Runtime's transformer fusions, int8 quantization, fp16.
- :mod:`~recbole_llm.export.triton`: a Triton model repository.
- :mod:`~recbole_llm.export.pipeline`: the whole export (:func:`export_checkpoint`, returning an
  :class:`ExportResult`), written to a temporary folder renamed into place only when everything passed.

Importing this package imports nothing heavy; names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ExportOptions": "options",
    "ExportResult": "pipeline",
    "export_checkpoint": "pipeline",
    "export_model": "pipeline",
    "load_for_export": "pipeline",
    "ScoringGraph": "graph",
    "ValidationReport": "validate",
    "ValidationFailed": "validate",
    "ScoresDiffer": "validate",
    "RankingDiffers": "validate",
    "OverlapTooLow": "validate",
    "validation_inputs": "validate",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")


__all__ = list(_WHERE)
