"""What to export and where, checked before anything heavy loads: ``recbole-llm export`` answers a bad option
or an unusable ``--output`` at once, without importing torch or reading the checkpoint."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from recbole_llm.errors import ConfigError, RecboleLLMError
from recbole_llm.artifact.spec import METADATA_FILE
from recbole_llm.settings import integer, number

OPSETS = (14, 20)  # the ONNX opsets the exporter and ONNX Runtime's transformer optimizer both handle


@dataclass
class ExportOptions:
    """What to export (see :mod:`recbole_llm.export`); checked by :func:`check_options`."""

    opset: int = 17
    top_k: int | None = None  # the graph returns the best K items; None: every item's score
    optimize: bool = False  # ONNX Runtime's transformer fusions
    int8: bool = False  # dynamic int8 (CPU)
    fp16: bool = False  # fp16 (GPU)
    triton: bool = False  # also a Triton model repository
    force: bool = False  # replace an existing artifact at the output
    validation_rows: int = 256  # real test histories the export is validated on
    # fp32 parity against PyTorch; None: 1e-4 on ONNX Runtime's CPU provider, 1e-3 on CUDA (its fp32
    # matrix products may use TF32 and other kernels than PyTorch's CPU ones)
    max_abs_diff: float | None = None
    min_overlap: float = 0.95  # top-10 overlap with PyTorch that fp16 and int8 must keep, 0 to 1
    triton_max_batch_size: int = 256
    # the graph returns user vectors and the item table is a file (items can be added; plugin models only)
    item_index: bool = False
    # settings applied to the checkpoint's Config (data_path for data moved since training, ...)
    config_overrides: dict = field(default_factory=dict)


def check_options(options: ExportOptions) -> None:
    """Raises ConfigError naming the first option out of range or of the wrong type (RecboleLLMError: --fp16
    without a GPU)."""
    for name in ("optimize", "int8", "fp16", "triton", "force", "item_index"):
        if not isinstance(getattr(options, name), bool):
            raise ConfigError(f"{name}={getattr(options, name)!r:.40} must be True or False")
    if options.int8 and options.fp16:
        raise ConfigError("--int8 and --fp16 exclude each other: int8 is for CPU, fp16 for GPU; pick one")
    if options.item_index:
        clash = next((flag for flag, on in (("--top-k", options.top_k is not None), ("--int8", options.int8),
                                             ("--fp16", options.fp16), ("--triton", options.triton)) if on), None)
        if clash:
            raise ConfigError(f"--item-index and {clash} exclude each other: an item-index artifact ranks in the "
                              "runtime, in fp32 (the request's k); drop one of them")
    integer("--opset", options.opset, low=OPSETS[0], high=OPSETS[1], example=17)
    if options.top_k is not None:  # None: every item's score
        integer("--top-k", options.top_k, example=10)
    integer("validation_rows", options.validation_rows, example=256)
    integer("triton_max_batch_size", options.triton_max_batch_size, example=256)
    number("min_overlap", options.min_overlap, low=0, high=1, example=0.95)
    # None: the provider's default; an infinite one (no parity bound) stays allowed
    tolerance = options.max_abs_diff
    if tolerance is not None and not (isinstance(tolerance, float) and math.isinf(tolerance)):
        number("max_abs_diff", tolerance, example=1e-4)
    if not isinstance(options.config_overrides, dict):
        raise ConfigError("config_overrides must be a dict of Config settings, e.g. {'data_path': 'DIR'}")
    if options.fp16:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RecboleLLMError(
                "--fp16 needs a GPU: ONNX Runtime has no CUDAExecutionProvider here (install onnxruntime-gpu: "
                "pip install 'recbole_llm[gpu]'); on CPU use --int8")


def check_output(output: str | os.PathLike, force: bool) -> Path:
    """The artifact folder ``output``, resolved, if an export may write it: new, or an artifact to replace
    with ``force`` (never a folder of other things, a file or the current folder), inside a writable folder."""
    if not os.fspath(output).strip():  # Path("") is the current folder
        raise RecboleLLMError("--output is empty: name the artifact folder to create, e.g. --output artifacts/bert")
    output = Path(output).resolve()
    if output.exists() and not force:
        raise RecboleLLMError(f"output '{output}' exists; choose another output folder, or replace it (--force; "
                              "ExportOptions(force=True) in Python)")
    if output.exists() and not (output.is_dir() and (output / METADATA_FILE).is_file()):
        # --force replaces an artifact, never a folder of other things (".", a home folder) or a file
        raise RecboleLLMError(f"output '{output}' exists and is not an artifact (no {METADATA_FILE}): "
                              "--force replaces artifacts only; choose a new folder")
    if output == Path.cwd() or output in Path.cwd().parents:
        raise RecboleLLMError(f"output '{output}' holds the current folder: choose a new folder")
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RecboleLLMError(f"--output '{output}' is inside '{parent}', which is a file: choose a folder")
            break
    existing = next(p for p in output.parents if p.exists())
    try:
        with tempfile.TemporaryDirectory(prefix=".recbole_llm-write-check-", dir=existing):
            pass
    except OSError as error:
        raise RecboleLLMError(
            f"--output '{output}' cannot be created: '{existing}' is not writable ({error.strerror}); choose "
            "another folder"
        ) from None
    return output


def check_before_loading(checkpoint: str | os.PathLike, output: str | os.PathLike, options: ExportOptions) -> None:
    """Everything an export can refuse before it reads the checkpoint: options, output, the file's presence."""
    from recbole_llm.checkpoint.loading import check_exists  # imports no torch

    check_options(options)
    check_output(output, options.force)
    check_exists(checkpoint)
