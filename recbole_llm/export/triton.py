"""A Triton Inference Server model repository for an artifact: ``triton/<name>/config.pbtxt`` and
``triton/<name>/1/model.onnx``, for Triton's onnxruntime backend with dynamic batching.

The configuration is derived from the artifact contract (:mod:`recbole_llm.artifact.spec`): the batch
axis becomes Triton's, other named axes ``-1``, and a per-row scalar (``item_length``) is sent as ``[1]``
and reshaped to a scalar. When tritonclient is installed the text is parsed against Triton's own
ModelConfig schema before it is written.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from recbole_llm.errors import RecboleLLMError
from recbole_llm.artifact.spec import MODEL_FILE, TRITON_FOLDER, TensorSpec, input_specs, output_specs

TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32"}


def triton_name(model_name: str) -> str:
    """A Triton model name: lower case, letters, digits and underscores."""
    return re.sub(r"[^a-z0-9_]+", "_", model_name.lower())


def _tensor(spec: TensorSpec) -> str:
    dims = [d if isinstance(d, int) else -1 for d in spec.shape[1:]]  # Triton owns the batch axis
    reshape = ""
    if not dims:  # one value per row: Triton needs a dimension, the graph takes a scalar
        dims, reshape = [1], " reshape: { shape: [ ] }"
    shown_dims = ", ".join(str(d) for d in dims)
    return f'  {{ name: "{spec.name}" data_type: {TRITON_TYPES[spec.dtype]} dims: [ {shown_dims} ]{reshape} }}'


def triton_config(name: str, top_k: int | None, n_items: int, max_batch_size: int) -> str:
    """The model configuration (protobuf text) for an artifact's graph."""
    return "\n".join([
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        ",\n".join(_tensor(spec) for spec in input_specs(top_k)),
        "]",
        "output [",
        ",\n".join(_tensor(spec) for spec in output_specs(top_k, n_items)),
        "]",
        "dynamic_batching { }",
        'instance_group [ { kind: KIND_AUTO } ]',
        "",
    ])


def check_triton_config(text: str) -> None:
    """Parse against Triton's own ModelConfig schema when tritonclient is installed."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise RecboleLLMError(f"generated Triton config is invalid: {error}") from None


def write_repository(folder: Path, model_name: str, top_k: int | None, n_items: int, max_batch_size: int) -> Path:
    """``folder/triton/<name>/{config.pbtxt, 1/model.onnx}`` beside ``folder/model.onnx``; returns the
    model's folder."""
    name = triton_name(model_name)
    text = triton_config(name, top_k, n_items, max_batch_size)
    check_triton_config(text)
    model_dir = folder / TRITON_FOLDER / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(text)
    shutil.copyfile(folder / MODEL_FILE, model_dir / "1" / MODEL_FILE)
    return model_dir
