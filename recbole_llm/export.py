"""ONNX export: from a RecBole checkpoint to a validated, optimized, self-contained artifact.

    recbole-llm export --checkpoint saved/BERTLoRA-....pth --output artifacts/bertlora [--top-k 10]
        [--opset 17] [--optimize] [--int8 | --fp16] [--triton] [--force]

Steps, following optimum's exporter (export, then run the runtime against the framework on the same inputs
and fail loudly past a tolerance):

1. Load the checkpoint safely (:func:`recbole_llm.checkpoint.load_checkpoint`: a pickle that would run code
   is refused) and rebuild model and data with RecBole's ``load_data_and_model``.
2. Merge LoRA-family adapters into the backbone where they can merge (item representations are the model's
   own tables, baked into the graph as constants).
3. Trace with the TorchScript exporter (ONNX Runtime's transformer optimizer fuses its BERT graphs) with
   dynamic batch and length; check the saved graph's input shapes really are dynamic.
4. Optionally optimize (ONNX Runtime transformer fusions, fused-operator counts reported) and quantize
   (dynamic int8 for CPU) or convert to fp16 (GPU).
5. Validate with ONNX Runtime against the PyTorch model on real test sequences of the checkpoint's dataset,
   cut to mixed lengths (1 ... MAX_ITEM_LIST_LENGTH), at batch sizes other than the traced one.
6. Write ``model.onnx``, ``metadata.json`` (the same keys in the graph's metadata_props) and, with
   ``--triton``, a Triton model repository, into a temporary folder that is renamed into place only when
   everything passed: a failed export leaves nothing behind.

The graph: inputs ``item_seq`` int64 [batch, length] (internal item ids, right-padded with 0) and
``item_length`` int64 [batch]; with ``top_k`` also ``exclude_items`` int64 [batch, n] (items never to
return, 0-padded: the user's whole history when seen items are excluded, which may be longer than the
model's window of ``max_length`` items), and outputs ``top_items`` int64 / ``top_scores`` float [batch, K];
without it, one output ``scores`` float [batch, n_items] (column 0 is padding).
"""

from __future__ import annotations

import copy
import datetime
import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recbole_llm.errors import RecboleLLMError
from recbole_llm.runtime import FORMAT_VERSION  # the artifact format, defined beside its reader
VALIDATION_TOP = 10


@dataclass
class ExportOptions:
    """What to export; see the module docstring."""

    opset: int = 17
    top_k: int | None = None
    optimize: bool = False
    int8: bool = False
    fp16: bool = False
    triton: bool = False
    force: bool = False
    validation_rows: int = 256
    # fp32 parity against PyTorch; None: 1e-4 on ONNX Runtime's CPU provider, 1e-3 on CUDA (its fp32
    # matrix products may use TF32 and other kernels than PyTorch's CPU ones)
    max_abs_diff: float | None = None
    min_overlap: float = 0.95  # top-10 overlap for fp16 and int8
    triton_max_batch_size: int = 256
    # settings applied to the checkpoint's Config (data_path for data moved since training, ...)
    config_overrides: dict = field(default_factory=dict)


@dataclass
class ValidationReport:
    precision: str
    rows: int
    lengths: list[int]
    batch_sizes: list[int]
    max_abs_diff: float
    top10_identical_rows: float
    top10_order_mismatches_beyond_ties: int
    top10_overlap: float
    passed: bool
    reason: str = ""
    fused_operators: dict[str, int] = field(default_factory=dict)


class ScoringGraph(nn.Module):
    """What goes into the ONNX graph: RecBole's ``full_sort_predict``, then optional top-K with exclusions."""

    def __init__(self, model: nn.Module, top_k: int | None):
        super().__init__()
        self.model = model
        self.top_k = top_k
        self.is_bert4rec = type(model).__name__ == "BERT4Rec"

    def scores(self, item_seq: torch.Tensor, item_length: torch.Tensor) -> torch.Tensor:
        if self.is_bert4rec:
            return self._bert4rec_scores(item_seq, item_length)
        model = self.model
        return model.full_sort_predict({model.ITEM_SEQ: item_seq, model.ITEM_SEQ_LEN: item_length})

    def _bert4rec_scores(self, item_seq: torch.Tensor, item_length: torch.Tensor) -> torch.Tensor:
        # BERT4Rec.reconstruct_test_data places the mask token with a Python loop over the batch, which a
        # trace would unroll for the example batch size. The same placement, as one scatter:
        model = self.model
        padded = torch.cat((item_seq, torch.zeros_like(item_seq[:, :1])), dim=-1)
        mask = torch.full_like(item_length.unsqueeze(-1), model.mask_token)
        padded = padded.scatter(1, item_length.unsqueeze(-1), mask)[:, 1:]
        hidden = model.gather_indexes(model.forward(padded), item_length - 1)
        return hidden @ model.item_embedding.weight[: model.n_items].t() + model.output_bias

    def forward(self, item_seq, item_length, exclude_items=None):
        scores = self.scores(item_seq, item_length)
        if self.top_k is None:
            return scores
        # exclude_items: [batch, n] ids never to return (0-padded), e.g. the whole raw history
        drop = torch.zeros_like(scores, dtype=torch.bool).scatter(
            1, exclude_items, torch.ones_like(exclude_items, dtype=torch.bool))
        drop[:, 0] = True  # padding is never recommended
        masked = scores.masked_fill(drop, float("-inf"))
        top_scores, top_items = torch.topk(masked, self.top_k, dim=-1)
        return top_items, top_scores


# ---------------------------------------------------------------------------------------------------------
# loading


def load_for_export(checkpoint: str | os.PathLike, overrides: dict | None = None):
    """(config, model, dataset, test_data) from a checkpoint, loaded without running code from it;
    ``overrides`` are set on its Config first (see :func:`recbole_llm.checkpoint.config_overrides`)."""
    import sys

    from recbole_llm.checkpoint import config_overrides

    # recbole_llm's load_data_and_model checks the file first (one-line errors for missing, foreign or
    # malicious files) and loads it through the allow-list.
    from recbole.quick_start import load_data_and_model

    argv, sys.argv = sys.argv, sys.argv[:1]  # RecBole reads --key=value from sys.argv
    try:
        with config_overrides(overrides):
            config, model, dataset, _, _, test_data = load_data_and_model(os.fspath(checkpoint))
    finally:
        sys.argv = argv
    model.eval()
    return config, model, dataset, test_data


def export_model(model: nn.Module) -> tuple[nn.Module, bool]:
    """A copy of ``model`` ready to trace: LoRA-family adapters merged where they can merge, and item
    representations (text ones included) computed once and baked in as a constant table."""
    exported = copy.deepcopy(model).eval()
    merge = getattr(exported, "merge_adapters", None)
    merged = bool(merge()) if merge is not None else False
    bake = getattr(exported, "bake_item_table", None)
    if bake is not None:
        bake()
    return exported, merged


# ---------------------------------------------------------------------------------------------------------
# validation inputs: real test sequences, cut to mixed lengths


def validation_inputs(model, test_data, rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real test histories, each cut to its most recent k items with k cycling 1 ... MAX_ITEM_LIST_LENGTH."""
    sequences, lengths = [], []
    for batch in test_data:
        interaction = batch[0]
        sequences.append(interaction[model.ITEM_SEQ].cpu().numpy())
        lengths.append(interaction[model.ITEM_SEQ_LEN].cpu().numpy())
        if sum(len(s) for s in sequences) >= rows:
            break
    item_seq = np.concatenate(sequences)[:rows]
    item_length = np.concatenate(lengths)[:rows]
    # the model's window: pre-split data (benchmark_filename) may hold longer histories than it was trained on
    max_length = int(model.max_seq_length)
    rng = np.random.default_rng(seed)
    wanted = np.concatenate([[1, max_length, 2], rng.integers(1, max_length + 1, size=len(item_seq))])
    cut_seq = np.zeros((len(item_seq), max_length), dtype=item_seq.dtype)
    cut_length = np.zeros_like(item_length)
    for row, (sequence, length) in enumerate(zip(item_seq, item_length)):
        keep = int(min(wanted[row], length))
        cut_seq[row, :keep] = sequence[length - keep : length]
        cut_length[row] = keep
    return cut_seq.astype(np.int64), cut_length.astype(np.int64)


def _providers(fp16: bool) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if fp16:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _ort_outputs(path: Path, feeds: dict[str, np.ndarray], fp16: bool, batch_sizes: list[int]):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=_providers(fp16))
    rows = len(next(iter(feeds.values())))
    outputs, start, turn = [], 0, 0
    while start < rows:
        size = batch_sizes[turn % len(batch_sizes)]
        chunk = {name: value[start : start + size] for name, value in feeds.items()}
        outputs.append(session.run(None, chunk))
        start, turn = start + size, turn + 1
    return [np.concatenate([out[i] for out in outputs]) for i in range(len(outputs[0]))]


def validate(
    onnx_path: Path,
    reference_model: nn.Module,
    item_seq: np.ndarray,
    item_length: np.ndarray,
    options: ExportOptions,
    precision: str,
) -> ValidationReport:
    """ONNX Runtime against the PyTorch model (before merging) on the same rows."""
    graph = ScoringGraph(reference_model, top_k=None).eval()
    with torch.no_grad():
        reference = graph(torch.from_numpy(item_seq), torch.from_numpy(item_length)).numpy()
    reference = reference.copy()
    reference[:, 0] = -np.inf  # padding is not an item
    # batch sizes that differ from the traced example (2), so a baked-in batch size would show
    batch_sizes = [1, 7, 64]
    tolerance = options.max_abs_diff
    if tolerance is None:
        tolerance = 1e-3 if _providers(precision == "fp16")[0] == "CUDAExecutionProvider" else 1e-4
    feeds = {"item_seq": item_seq, "item_length": item_length}
    k = options.top_k
    if k is not None:
        feeds["exclude_items"] = np.zeros((len(item_seq), 1), dtype=np.int64)
        top_items, top_scores = _ort_outputs(onnx_path, feeds, precision == "fp16", batch_sizes)
        top = min(VALIDATION_TOP, k)
        ref_order = np.argsort(-reference, axis=1, kind="stable")[:, :k]
        ref_scores = np.take_along_axis(reference, ref_order, axis=1)
        max_diff = float(np.max(np.abs(ref_scores - top_scores)))
        got, want = top_items[:, :top], ref_order[:, :top]
    else:
        (scores,) = _ort_outputs(onnx_path, feeds, precision == "fp16", batch_sizes)
        max_diff = float(np.max(np.abs(reference[:, 1:] - scores[:, 1:])))
        scores = scores.astype(np.float32).copy()
        scores[:, 0] = -np.inf
        top = VALIDATION_TOP
        got = np.argsort(-scores, axis=1, kind="stable")[:, :top]
        want = np.argsort(-reference, axis=1, kind="stable")[:, :top]

    identical = np.all(got == want, axis=1)
    # An order difference between two items whose reference scores tie (within the tolerance) is no error.
    got_ref_scores = np.take_along_axis(reference, got, axis=1)
    want_ref_scores = np.take_along_axis(reference, want, axis=1)
    beyond_ties = int(np.sum(np.any(np.abs(got_ref_scores - want_ref_scores) > tolerance, axis=1)))
    overlap = float(np.mean([len(set(g) & set(w)) / top for g, w in zip(got, want)]))
    report = ValidationReport(
        precision=precision,
        rows=len(item_seq),
        lengths=sorted({int(x) for x in item_length}),
        batch_sizes=batch_sizes,
        max_abs_diff=max_diff,
        top10_identical_rows=float(identical.mean()),
        top10_order_mismatches_beyond_ties=beyond_ties,
        top10_overlap=overlap,
        passed=True,
    )
    if precision == "fp32":
        if not max_diff <= tolerance:
            report.passed, report.reason = False, (
                f"max |ONNX Runtime - PyTorch| score difference {max_diff:.3g} exceeds {tolerance:g}"
            )
        elif beyond_ties:
            report.passed, report.reason = False, f"top-{top} order differs from PyTorch in {beyond_ties} rows"
    elif overlap < options.min_overlap:
        report.passed, report.reason = False, (
            f"{precision} top-{top} overlap with PyTorch is {overlap:.3f}, below {options.min_overlap}"
        )
    return report


# ---------------------------------------------------------------------------------------------------------
# graph building


def _trace(graph: ScoringGraph, path: Path, max_length: int, opset: int) -> None:
    import warnings

    # an example with batch and length >= 2, so the exporter keeps both axes dynamic
    item_seq = torch.ones((2, max_length), dtype=torch.long)
    item_length = torch.tensor([max_length, 2], dtype=torch.long)
    item_seq[1, 2:] = 0
    inputs: tuple = (item_seq, item_length)
    names = ["item_seq", "item_length"]
    dynamic_axes: dict[str, dict[int, str]] = {"item_seq": {0: "batch", 1: "length"}, "item_length": {0: "batch"}}
    if graph.top_k is not None:
        inputs += (torch.tensor([[3, 5, 0], [0, 0, 0]], dtype=torch.long),)
        names.append("exclude_items")
        dynamic_axes["exclude_items"] = {0: "batch", 1: "excluded"}
        outputs = ["top_items", "top_scores"]
    else:
        outputs = ["scores"]
    for name in outputs:
        dynamic_axes[name] = {0: "batch"}
    with warnings.catch_warnings():
        # The tracer's notes on Python-side shape checks (constant for these graphs) and the exporter's
        # deprecation notice are not the user's business.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            inputs,
            str(path),
            input_names=names,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
    _check_dynamic_inputs(path)


def _check_dynamic_inputs(path: Path) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        fixed = [d.dim_value for d in dims if not d.dim_param]
        if fixed:
            raise RecboleLLMError(
                f"the exporter fixed input '{graph_input.name}' to shape {[d.dim_value or d.dim_param for d in dims]}; "
                "dynamic batch and length are required (report this model as unsupported)"
            )


def _optimize(path: Path, model: nn.Module, opset: int) -> dict[str, int]:
    """ONNX Runtime's transformer fusions (Attention, SkipLayerNorm, BiasGelu, ...) for BERT-style graphs."""
    from onnxruntime.transformers.optimizer import optimize_model

    encoder_config = getattr(getattr(model, "encoder", None), "config", None)
    num_heads = getattr(encoder_config, "num_attention_heads", 0) or 0
    hidden_size = getattr(encoder_config, "hidden_size", 0) or 0
    optimized = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=1, use_gpu=False)
    counts = {name: int(count) for name, count in optimized.get_fused_operator_statistics().items() if count}
    optimized.save_model_to_file(str(path))
    return counts


def _scoring_nodes(path: Path, n_items: int) -> list[str]:
    """The MatMul/Gemm nodes that score every item: their weight has a dimension of n_items."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    item_tables = {init.name for init in model.graph.initializer if n_items in init.dims}
    return [
        node.name for node in model.graph.node
        if node.op_type in ("MatMul", "Gemm") and any(name in item_tables for name in node.input)
    ]


def _quantize_int8(path: Path, n_items: int) -> None:
    """Dynamic int8 quantization of the encoder's weights, activations quantized at run time.

    The final product with the item table stays in float: it ranks every item, and quantizing it costs
    most of the top-10 overlap for a few percent of the compute.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_name("model.int8.onnx")
    try:
        # Fused contrib operators have no ONNX type inference: tell the quantizer their outputs are float.
        quantize_dynamic(
            str(path), str(quantized), weight_type=QuantType.QInt8, per_channel=True,
            nodes_to_exclude=_scoring_nodes(path, n_items),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    except (RuntimeError, ValueError) as error:
        raise RecboleLLMError(f"int8 quantization failed: {str(error).splitlines()[0]}") from None
    os.replace(quantized, path)


def _convert_fp16(path: Path) -> None:
    from onnxruntime.transformers.onnx_model import OnnxModel

    import onnx

    model = OnnxModel(onnx.load(str(path)))
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(path))


# ---------------------------------------------------------------------------------------------------------
# metadata and Triton


def item_tokens(config, dataset) -> list[str]:
    """Internal item id -> raw item token, index 0 padding: the map the checkpoint was trained with
    (:mod:`recbole_llm.world`), else the dataset's for checkpoints that predate it."""
    from recbole_llm import world

    trained = world.stored(config)
    if trained is not None and dataset.iid_field in trained["token_maps"]:
        tokens = list(trained["token_maps"][dataset.iid_field])
    else:
        tokens = [str(token) for token in dataset.field2id_token[dataset.iid_field]]
    tokens[0] = "[PAD]"
    return tokens


def _versions(opset: int) -> dict[str, Any]:
    import onnxruntime
    import recbole

    import recbole_llm

    return {
        "recbole_llm": recbole_llm.__version__,
        "recbole": recbole.__version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": opset,
    }


def triton_name(model_name: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", model_name.lower())


def triton_config(name: str, top_k: int | None, n_items: int, max_batch_size: int) -> str:
    """A Triton model configuration (protobuf text) for the onnxruntime backend with dynamic batching."""
    inputs = [
        '  { name: "item_seq" data_type: TYPE_INT64 dims: [ -1 ] }',
        '  { name: "item_length" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } }',
    ]
    if top_k is not None:
        inputs.append('  { name: "exclude_items" data_type: TYPE_INT64 dims: [ -1 ] }')
        outputs = [
            f'  {{ name: "top_items" data_type: TYPE_INT64 dims: [ {top_k} ] }}',
            f'  {{ name: "top_scores" data_type: TYPE_FP32 dims: [ {top_k} ] }}',
        ]
    else:
        outputs = [f'  {{ name: "scores" data_type: TYPE_FP32 dims: [ {n_items} ] }}']
    return "\n".join([
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        ",\n".join(inputs),
        "]",
        "output [",
        ",\n".join(outputs),
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


# ---------------------------------------------------------------------------------------------------------
# the whole export


def _check_options(options: ExportOptions) -> None:
    import onnxruntime as ort

    if options.int8 and options.fp16:
        raise RecboleLLMError("--int8 and --fp16 exclude each other: int8 is for CPU, fp16 for GPU; pick one")
    if options.fp16 and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RecboleLLMError(
            "--fp16 needs a GPU: ONNX Runtime has no CUDAExecutionProvider here (install onnxruntime-gpu: "
            "pip install 'recbole_llm[gpu]'); on CPU use --int8"
        )
    if not 14 <= options.opset <= 20:
        raise RecboleLLMError(f"--opset {options.opset} is not supported; use 14 to 20 (17 is the default)")
    if options.top_k is not None and options.top_k <= 0:
        raise RecboleLLMError(f"--top-k {options.top_k} must be a positive number of items")


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, options: ExportOptions | None = None) -> Path:
    """Export a RecBole checkpoint to an artifact folder; returns the folder. Raises RecboleLLMError."""
    options = options or ExportOptions()
    _check_options(options)
    output = Path(output).resolve()
    if output.exists() and not options.force:
        raise RecboleLLMError(f"output '{output}' exists; choose another --output or pass --force to replace it")
    if output.exists() and not (output.is_dir() and (output / "metadata.json").is_file()):
        # --force replaces an artifact, never a folder of other things (".", a home folder) or a file
        raise RecboleLLMError(f"output '{output}' exists and is not an artifact (no metadata.json): --force "
                              "replaces artifacts only; choose a new folder")
    if output == Path.cwd() or output in Path.cwd().parents:
        raise RecboleLLMError(f"output '{output}' holds the current folder: choose a new folder")
    _check_output_place(output)
    _check_exportable(checkpoint)

    config, model, dataset, test_data = load_for_export(checkpoint, options.config_overrides)
    if options.top_k is not None and options.top_k >= model.n_items:
        raise RecboleLLMError(f"--top-k {options.top_k} must be below the {model.n_items - 1} items of the model")
    exported, merged = export_model(model)
    max_length = int(config["MAX_ITEM_LIST_LENGTH"])
    item_seq, item_length = validation_inputs(model, test_data, options.validation_rows)

    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{os.getpid()}-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact is an ordinary folder
    try:
        onnx_path = staging / "model.onnx"
        _trace(ScoringGraph(exported, options.top_k).eval(), onnx_path, max_length, options.opset)
        reports = [validate(onnx_path, model, item_seq, item_length, options, "fp32")]
        fused: dict[str, int] = {}
        if options.optimize:
            fused = _optimize(onnx_path, exported, options.opset)
            report = validate(onnx_path, model, item_seq, item_length, options, "fp32")
            report.fused_operators = fused
            reports.append(report)
        if options.int8:
            _quantize_int8(onnx_path, int(model.n_items))
            reports.append(validate(onnx_path, model, item_seq, item_length, options, "int8"))
        if options.fp16:
            _convert_fp16(onnx_path)
            reports.append(validate(onnx_path, model, item_seq, item_length, options, "fp16"))
        failed = [r for r in reports if not r.passed]
        if failed:
            raise RecboleLLMError(f"export failed validation: {failed[0].reason}; no artifact was written")

        precision = "int8" if options.int8 else "fp16" if options.fp16 else "fp32"
        metadata = {
            "format_version": FORMAT_VERSION,
            "model": config["model"],
            "dataset": config["dataset"],
            "checkpoint": os.path.basename(os.fspath(checkpoint)),
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "max_length": max_length,
            "n_items": int(model.n_items),
            "top_k": options.top_k,
            "precision": precision,
            "optimized": options.optimize,
            "fused_operators": fused,
            "adapters_merged": merged,
            "item_repr": config["item_repr"] or "id",
            "inputs": ["item_seq", "item_length"] + (["exclude_items"] if options.top_k else []),
            "outputs": ["top_items", "top_scores"] if options.top_k else ["scores"],
            "versions": _versions(options.opset),
            "validation": [asdict(r) for r in reports],
            "item_tokens": item_tokens(config, dataset),
        }
        _write_metadata(onnx_path, metadata)
        (staging / "metadata.json").write_text(json.dumps(metadata, indent=1) + "\n")
        if options.triton:
            name = triton_name(config["model"])
            text = triton_config(name, options.top_k, int(model.n_items), options.triton_max_batch_size)
            check_triton_config(text)
            version_dir = staging / "triton" / name / "1"
            version_dir.mkdir(parents=True)
            (staging / "triton" / name / "config.pbtxt").write_text(text)
            shutil.copyfile(onnx_path, version_dir / "model.onnx")
        _move_into_place(staging, output)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        reason = "no space left on the device" if error.errno == errno.ENOSPC else error.strerror or str(error)
        raise RecboleLLMError(
            f"could not write the artifact to '{output}': {reason}; free space or choose another --output "
            "(nothing was written)"
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _check_output_place(output: Path) -> None:
    """Refuse an ``--output`` that cannot be created, before loading anything."""
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


def _check_exportable(checkpoint: str | os.PathLike) -> None:
    """Only sequential models have a history to score: say so before building the data."""
    from recbole.utils import ModelType

    from recbole_llm.checkpoint import load_checkpoint

    config = load_checkpoint(checkpoint)["config"]
    if config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        raise RecboleLLMError(
            f"{config['model']} is not a sequential model (it ranks without a history), so there is nothing to "
            "export; export a sequential model such as BERTLoRA, BERTRec, SASRec, GRU4Rec or BERT4Rec"
        )


def _remove_leftovers(output: Path) -> None:
    """Staging and swap folders of exports to ``output`` whose process is gone (killed mid-export)."""
    for leftover in output.parent.glob(f".{output.name}.*"):
        match = re.fullmatch(rf"\.{re.escape(output.name)}\.(?:partial|old)-(\d+)(?:-.*)?", leftover.name)
        if match is None or not leftover.is_dir():
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass


def _write_metadata(onnx_path: Path, metadata: dict) -> None:
    import onnx

    model = onnx.load(str(onnx_path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, str(onnx_path))


def _move_into_place(staging: Path, output: Path) -> None:
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")  # named so _remove_leftovers finds it
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output)
