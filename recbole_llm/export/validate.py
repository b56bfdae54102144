"""Validation: ONNX Runtime against the PyTorch model on real test histories, at mixed lengths and batch sizes.

fp32 must match PyTorch's scores within a tolerance and keep its top-10 order (up to tied scores); int8
and fp16 must keep a top-10 overlap floor. A failure raises a :class:`ValidationFailed` of the kind that
failed, carrying its :class:`ValidationReport`. Importing this module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recbole_llm.errors import RecboleLLMError
from recbole_llm.artifact import ranking, spec

VALIDATION_TOP = 10
BATCH_SIZES = [1, 7, 64]  # other than the traced example's 2, so a baked-in batch size would show


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
    top: int = VALIDATION_TOP  # the top-N compared (top10_* fields): 10, or top_k when it is smaller
    fused_operators: dict[str, int] = field(default_factory=dict)  # ONNX Runtime fusions, with optimize
    quantized_operators: dict[str, int] = field(default_factory=dict)  # integer operators, with int8
    graph: str = "scores"  # what was compared: "scores" (the model.onnx), or "text tower" (item vectors)


class ValidationFailed(RecboleLLMError):
    """The exported graph does not rank like the PyTorch model; ``report`` holds the figures."""

    def __init__(self, report: ValidationReport):
        super().__init__(f"export failed validation: {report.reason}; no artifact was written")
        self.report = report


class ScoresDiffer(ValidationFailed):
    """fp32 scores differ from PyTorch's beyond the tolerance."""


class RankingDiffers(ValidationFailed):
    """fp32 top-10 order differs from PyTorch's beyond tied scores."""


class OverlapTooLow(ValidationFailed):
    """int8 or fp16 top-10 overlap with PyTorch is below the floor."""


def validation_inputs(model, test_data, rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real test histories (item_seq int64 [rows, max_length], item_length int64 [rows]), each cut to its most
    recent k items with k cycling 1, max_length, 2, then random lengths up to the model's window."""
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


def providers(fp16: bool) -> list[str]:
    """ONNX Runtime providers to validate on: CUDA first where present (required for fp16)."""
    import onnxruntime as ort

    if fp16:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _ort_outputs(path: Path, feeds: dict[str, np.ndarray], fp16: bool, batch_sizes: list[int],
                 shared: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """The graph's outputs for ``feeds`` (rows split into batches of ``batch_sizes`` in turn); ``shared``
    inputs (the item table) go whole into every call."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the validation figures are the report, not ONNX Runtime's notes
    session = ort.InferenceSession(str(path), options, providers=providers(fp16))
    rows = len(next(iter(feeds.values())))
    outputs, start, turn = [], 0, 0
    while start < rows:
        size = batch_sizes[turn % len(batch_sizes)]
        chunk = {name: value[start : start + size] for name, value in feeds.items()}
        outputs.append(session.run(None, {**chunk, **(shared or {})}))
        start, turn = start + size, turn + 1
    return [np.concatenate([out[i] for out in outputs]) for i in range(len(outputs[0]))]


def reference_scores(model, item_seq: np.ndarray, item_length: np.ndarray) -> np.ndarray:
    """PyTorch's scores, float [rows, n_items], with padding at -inf (it is not an item)."""
    import torch  # here: the report and the error kinds import without torch

    from recbole_llm.export.graph import ScoringGraph

    with torch.no_grad():
        scores = ScoringGraph(model, top_k=None).eval()(torch.from_numpy(item_seq), torch.from_numpy(item_length))
    scores = scores.float().numpy().copy()
    scores[:, 0] = -np.inf
    return scores


def validate(
    onnx_path: Path,
    reference: np.ndarray,
    item_seq: np.ndarray,
    item_length: np.ndarray,
    precision: str,
    top_k: int | None,
    tolerance: float | None = None,
    min_overlap: float = 0.95,
    item_vectors: np.ndarray | None = None,
) -> ValidationReport:
    """The graph at ``onnx_path`` in ONNX Runtime against ``reference`` (:func:`reference_scores` of the model
    before merging) on the same rows. ``tolerance``: fp32 max |score difference|, None for 1e-4 on ONNX
    Runtime's CPU provider and 1e-3 on CUDA (its fp32 products may use TF32). ``item_vectors`` float32
    [n_items, hidden]: the item table of a graph returning user vectors, scored as the runtime does
    (``user_vectors @ item_vectors.T``). Returns the report of a passing graph; raises ScoresDiffer,
    RankingDiffers or OverlapTooLow."""
    if tolerance is None:
        tolerance = 1e-3 if providers(precision == "fp16")[0] == "CUDAExecutionProvider" else 1e-4
    feeds = spec.feeds(item_seq, item_length, top_k=top_k)
    shared = None if item_vectors is None else {spec.ITEM_VECTORS: item_vectors}
    outputs = _ort_outputs(onnx_path, feeds, precision == "fp16", BATCH_SIZES, shared)
    if item_vectors is not None:
        outputs = [ranking.item_scores(outputs[0], item_vectors)]
    top = min(VALIDATION_TOP, top_k or VALIDATION_TOP)
    if top_k is not None:
        top_items, top_scores = outputs
        want, ref_scores = ranking.top_k(reference, top_k)
        max_diff = float(np.max(np.abs(ref_scores - top_scores)))
        got, want = top_items[:, :top], want[:, :top]
    else:
        (scores,) = outputs
        max_diff = float(np.max(np.abs(reference[:, 1:] - scores[:, 1:])))
        got, _ = ranking.top_k(scores, top)
        want, _ = ranking.top_k(reference, top)

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
        batch_sizes=BATCH_SIZES,
        max_abs_diff=max_diff,
        top10_identical_rows=float(identical.mean()),
        top10_order_mismatches_beyond_ties=beyond_ties,
        top10_overlap=overlap,
        passed=True,
        top=top,
    )
    failure: type[ValidationFailed] | None = None
    if precision == "fp32":
        if not max_diff <= tolerance:
            failure = ScoresDiffer
            report.reason = f"max |ONNX Runtime - PyTorch| score difference {max_diff:.3g} exceeds {tolerance:g}"
        elif beyond_ties:
            failure = RankingDiffers
            report.reason = f"top-{top} order differs from PyTorch in {beyond_ties} rows"
    elif overlap < min_overlap:
        failure = OverlapTooLow
        report.reason = f"{precision} top-{top} overlap with PyTorch is {overlap:.3f}, below {min_overlap}"
    if failure is not None:
        report.passed = False
        raise failure(report)
    return report


TEXT_TOWER_ROWS = 64  # item texts the text tower is validated on


def validate_text_tower(tower, onnx_path: Path, input_ids, attention_mask, has_text,
                        tolerance: float | None = None) -> ValidationReport:
    """The text tower at ``onnx_path`` in ONNX Runtime against PyTorch's ``tower`` on up to 64 of the model's
    own item texts (``input_ids``, ``attention_mask`` int64 [n_items, tokens], ``has_text`` bool [n_items]):
    the item vectors must agree within ``tolerance`` (default as :func:`validate`), else ScoresDiffer."""
    import torch

    if tolerance is None:
        tolerance = 1e-3 if providers(False)[0] == "CUDAExecutionProvider" else 1e-4
    rows = torch.nonzero(has_text).squeeze(-1)[:TEXT_TOWER_ROWS]
    ids, mask = input_ids[rows], attention_mask[rows]
    with torch.no_grad():
        expected = tower(ids, mask).float().numpy()
    feeds = {spec.TEXT_INPUT_IDS: ids.numpy(), spec.TEXT_ATTENTION_MASK: mask.numpy()}
    (got,) = _ort_outputs(onnx_path, feeds, False, BATCH_SIZES)
    max_diff = float(np.max(np.abs(expected - got))) if len(rows) else 0.0
    report = ValidationReport(precision="fp32", rows=len(rows), lengths=sorted({int(n) for n in mask.sum(1)}) or [0],
                              batch_sizes=BATCH_SIZES, max_abs_diff=max_diff, top10_identical_rows=1.0,
                              top10_order_mismatches_beyond_ties=0, top10_overlap=1.0, passed=True,
                              graph="text tower")
    if not max_diff <= tolerance:
        report.passed = False
        report.reason = (f"text tower: max |ONNX Runtime - PyTorch| item-vector difference {max_diff:.3g} exceeds "
                         f"{tolerance:g}")
        raise ScoresDiffer(report)
    return report
