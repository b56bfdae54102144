"""Serving an exported artifact with ONNX Runtime: raw item tokens in, top-K raw item tokens out.

Needs only onnxruntime and numpy (no RecBole, no torch):

    from recbole_llm.runtime import Recommender
    recommender = Recommender("artifacts/bertlora")
    [answer] = recommender.recommend([["242", "302", "377"]], k=10)
    answer.items, answer.scores, answer.unknown_tokens

Histories longer than the model's maximum length keep their most recent items. Unknown tokens follow
``unknown_tokens``: ``"skip"`` (default: dropped and counted in the answer) or ``"error"``. A history with
no known item left is an error.

The artifact is checked when it is loaded, so that a bad one fails at start rather than at the first
request: ``metadata.json`` must be a JSON object with well-typed keys, ``model.onnx`` must load in ONNX
Runtime, and the two must agree (inputs and outputs, item count, ``top_k``, ``max_length``, and the keys
export also wrote into the graph's metadata_props); then one history of ``max_length`` items is run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from recbole_llm.errors import RecboleLLMError

# The artifact format this runtime reads, written by recbole_llm.export. 2: top-k graphs take
# exclude_items (every item of the raw history) instead of format 1's exclude_seen bool, which could only
# drop the items inside the model's window.
FORMAT_VERSION = 2
UNKNOWN_TOKEN_POLICIES = ("skip", "error")
MAX_LENGTH_LIMIT = 1 << 16  # items per history a graph may take (metadata.json's max_length)
REEXPORT = "export the artifact again: recbole-llm export --checkpoint CHECKPOINT --output FOLDER --force"


def shown(text: str, limit: int = 60) -> str:
    """``text`` for an error message: one line, encodable (control characters and lone surrogates escaped),
    at most ``limit`` characters and a count."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return shown(lines[0] if lines else type(error).__name__, 300)


def _is_token(token: Any) -> bool:
    """A string, or an integer short enough to have a decimal form (Python refuses str() past 4,300 digits)."""
    return type(token) is str or (
        isinstance(token, (str, int, np.integer)) and not isinstance(token, (bool, np.bool_))
        and (isinstance(token, str) or abs(int(token)) < 10**100))


def _is_sequence(value: Any, ndim: int = 1) -> bool:
    """A list, tuple or ``ndim``-D array: ordered, and not a string, bytes or mapping."""
    if isinstance(value, np.ndarray):
        return value.ndim == ndim
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray, Mapping))


@dataclass
class Recommendation:
    items: list[str]
    scores: list[float]
    unknown_tokens: int  # tokens of this history that the model does not know (skipped)


class Encoded(NamedTuple):
    """Histories as the graph takes them, plus what post-processing needs."""

    item_seq: np.ndarray  # int64 [rows, max_length]: the most recent known items, 0-padded at the end
    item_length: np.ndarray  # int64 [rows]
    unknown: list[int]  # unknown tokens skipped, per row
    seen: list[np.ndarray]  # every known item id of each row's whole history, unique

    @staticmethod
    def join(parts: Sequence["Encoded"]) -> "Encoded":
        """Rows of several requests, in order, for one model call."""
        return Encoded(np.concatenate([p.item_seq for p in parts]), np.concatenate([p.item_length for p in parts]),
                       [u for p in parts for u in p.unknown], [s for p in parts for s in p.seen])


def exclusions(seen: Sequence[np.ndarray], exclude_seen: Sequence[bool]) -> np.ndarray:
    """The graph's ``exclude_items`` input, int64 [rows, n] 0-padded: each row's whole history where
    ``exclude_seen`` is set, nothing (a padding column) where it is not."""
    rows = [ids if flag else ids[:0] for ids, flag in zip(seen, exclude_seen)]
    out = np.zeros((len(rows), max([1, *(len(r) for r in rows)])), dtype=np.int64)
    for row, ids in enumerate(rows):
        out[row, : len(ids)] = ids
    return out


class Recommender:
    """An exported artifact loaded in ONNX Runtime (CUDA when available, else CPU)."""

    def __init__(
        self,
        artifact: str | Path,
        providers: Sequence[str] | None = None,
        unknown_tokens: str = "skip",
        intra_op_threads: int | None = None,
    ):
        import onnxruntime as ort

        folder = Path(artifact)
        model_path, metadata_path = folder / "model.onnx", folder / "metadata.json"
        if not model_path.is_file() or not metadata_path.is_file():
            raise RecboleLLMError(
                f"'{folder}' is not an exported artifact (needs model.onnx and metadata.json); "
                "create one with: recbole-llm export --checkpoint CHECKPOINT --output FOLDER"
            )
        if unknown_tokens not in UNKNOWN_TOKEN_POLICIES:
            raise RecboleLLMError(f"unknown_tokens '{unknown_tokens}' is not a policy; use 'skip' or 'error'")
        most = 4 * (os.cpu_count() or 1)  # ONNX Runtime would create them all (thousands took GBs and hung)
        if intra_op_threads is not None and (
                isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int)
                or not 1 <= intra_op_threads <= most):
            raise RecboleLLMError(f"intra_op_threads={intra_op_threads!r:.30} must be a number of threads from 1 to "
                                  f"{most} (4 per core), or None: all cores")
        self.metadata = _read_metadata(metadata_path)
        self.unknown_tokens = unknown_tokens
        self.max_length = self.metadata["max_length"]
        self.top_k = self.metadata.get("top_k")
        self.tokens = self.metadata["item_tokens"]
        self.token_to_id = {token: index for index, token in enumerate(self.tokens) if index}
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=list(providers))
        except Exception as error:  # noqa: BLE001 - ONNX Runtime's errors share no public base class
            raise RecboleLLMError(
                f"ONNX Runtime cannot load '{model_path}' ({_first_line(error)}); if the file is truncated or "
                f"corrupt, {REEXPORT}") from None
        _check_graph(self.session, model_path, metadata_path, self.metadata)
        self._probe(model_path, metadata_path)

    def _probe(self, model_path: Path, metadata_path: Path) -> None:
        """One history of ``max_length`` items through the graph: it runs, and its outputs have the shapes and
        item ids that metadata.json describes."""
        import onnxruntime as ort

        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # the failure is reported below, in one line
        feeds = {"item_seq": np.ones((1, self.max_length), dtype=np.int64),
                 "item_length": np.array([self.max_length], dtype=np.int64)}
        names = ["scores"] if self.top_k is None else ["top_items", "top_scores"]
        if self.top_k is not None:
            feeds["exclude_items"] = np.zeros((1, 1), dtype=np.int64)
        try:
            outputs = self.session.run(names, feeds, quiet)
        except Exception as error:  # noqa: BLE001
            raise RecboleLLMError(
                f"'{model_path}' fails on a history of max_length={self.max_length} items ({_first_line(error)}); "
                f"'{metadata_path}' must hold the max_length the model was exported with, or {REEXPORT}") from None
        width = len(self.tokens) if self.top_k is None else self.top_k
        if outputs[0].shape != (1, width):
            raise RecboleLLMError(
                f"'{model_path}' returns {names[0]} of shape {list(outputs[0].shape)} for one history, but "
                f"'{metadata_path}' says [1, {width}]; {REEXPORT}")
        if self.top_k is not None and not ((outputs[0] >= 0) & (outputs[0] < len(self.tokens))).all():
            raise RecboleLLMError(
                f"'{model_path}' returns item ids beyond the {len(self.tokens)} item_tokens of "
                f"'{metadata_path}'; {REEXPORT}")

    def encode(self, histories: Sequence[Sequence[str]]) -> Encoded:
        """Internal ids, right-padded, most recent ``max_length`` items; lengths; unknown-token counts; and
        every known item of each history, however long (what ``exclude_seen`` drops)."""
        if not _is_sequence(histories, ndim=2):
            raise RecboleLLMError(f"histories must be a list of histories (lists of item tokens), not "
                                  f"{type(histories).__name__}")
        if not len(histories):
            raise RecboleLLMError("histories is empty; pass a non-empty list of histories (lists of item tokens)")
        item_seq = np.zeros((len(histories), self.max_length), dtype=np.int64)
        item_length = np.zeros(len(histories), dtype=np.int64)
        unknown_counts, seen = [], []
        for row, history in enumerate(histories):
            if not _is_sequence(history):
                hint = "; pass a list of item tokens" if isinstance(history, (str, bytes)) else ""
                raise RecboleLLMError(
                    f"history {row} must be a list of item tokens, not {type(history).__name__}{hint}")
            for position, token in enumerate(history):
                if not _is_token(token):
                    raise RecboleLLMError(f"history {row}, position {position}: item tokens must be strings or "
                                          f"integers, not {type(token).__name__}")
            ids = [self.token_to_id.get(str(token)) for token in history]
            unknown = [str(token) for token, index in zip(history, ids) if index is None]
            if unknown and self.unknown_tokens == "error":
                raise RecboleLLMError(
                    f"history {row} has {len(unknown)} unknown item tokens (first: '{shown(unknown[0])}'); "
                    "drop them or use unknown_tokens='skip'"
                )
            every = [index for index in ids if index is not None]
            known = every[-self.max_length :]
            if not known:
                what = "is empty" if not len(history) else "has no item the model knows"
                raise RecboleLLMError(f"history {row} {what}; a recommendation needs at least one known item")
            item_seq[row, : len(known)] = known
            item_length[row] = len(known)
            unknown_counts.append(len(unknown))
            seen.append(np.unique(np.asarray(every, dtype=np.int64)))
        return Encoded(item_seq, item_length, unknown_counts, seen)

    @property
    def max_k(self) -> int:
        """The most items one answer can hold."""
        return self.top_k or len(self.tokens) - 1

    def check_k(self, k: int) -> None:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise RecboleLLMError(f"k must be an integer from 1 to {self.max_k}, not {type(k).__name__}")
        if not 1 <= k <= self.max_k:
            given = f"k={int(k)}" if abs(k) < 10**12 else "a k beyond 10^12"
            raise RecboleLLMError(f"{given} is out of range; this artifact returns 1 to {self.max_k} items")

    def recommend(
        self, histories: Sequence[Sequence[str]], k: int = 10, exclude_seen: bool = True
    ) -> list[Recommendation]:
        self.check_k(k)
        encoded = self.encode(histories)
        rows = len(encoded.item_seq)
        return self.rank(encoded, [k] * rows, [bool(exclude_seen)] * rows)

    def rank(self, encoded: Encoded, ks: Sequence[int], exclude_seen: Sequence[bool]) -> list[Recommendation]:
        """Encoded rows (``encode``, or several concatenated with :meth:`Encoded.join`) to answers in one
        ONNX Runtime call; k and exclude_seen per row, so rows of different requests can share the call.
        ``exclude_seen`` drops every item of the row's history, not only the model's window."""
        k_max = max(ks)
        exclude_items = exclusions(encoded.seen, exclude_seen)
        feeds = {"item_seq": encoded.item_seq, "item_length": encoded.item_length}
        if self.top_k is not None:
            feeds["exclude_items"] = exclude_items
            top_items, top_scores = self.session.run(["top_items", "top_scores"], feeds)
            top_items, top_scores = top_items[:, :k_max], top_scores[:, :k_max]
        else:
            (scores,) = self.session.run(["scores"], feeds)
            scores = scores.astype(np.float32, copy=True)
            np.put_along_axis(scores, exclude_items, -np.inf, axis=1)  # column 0 absorbs the padding
            scores[:, 0] = -np.inf  # padding is not an item
            top_items = np.argsort(-scores, axis=1, kind="stable")[:, :k_max]
            top_scores = np.take_along_axis(scores, top_items, axis=1)
        answers = []
        for items, scores_row, k, unknown in zip(top_items, top_scores, ks, encoded.unknown):
            items, scores_row = items[:k], scores_row[:k]
            finite = np.isfinite(scores_row)  # fewer than k recommendable items left after exclusions
            answers.append(Recommendation(
                items=[self.tokens[i] for i in items[finite]],
                scores=[float(s) for s in scores_row[finite]],
                unknown_tokens=int(unknown),
            ))
        return answers


def _read_metadata(path: Path) -> dict[str, Any]:
    """metadata.json, checked: a JSON object whose keys the runtime reads have the types export writes."""
    try:
        metadata = json.loads(path.read_bytes())
    except OSError as error:
        raise RecboleLLMError(f"cannot read '{path}' ({error.strerror or error}); check its permissions") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, huge numbers
        raise RecboleLLMError(f"'{path}' is not JSON ({_first_line(error)}); {REEXPORT}") from None
    if not isinstance(metadata, dict):
        raise RecboleLLMError(f"'{path}' holds a JSON {type(metadata).__name__}, not an object; {REEXPORT}")
    for key in ("max_length", "item_tokens"):
        if key not in metadata:
            raise RecboleLLMError(f"'{path}' has no '{key}'; {REEXPORT}")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        why = (" (format 1 artifacts drop only the items inside the model's window when excluding seen items)"
               if version == 1 else "")
        raise RecboleLLMError(f"'{path}' is artifact format {version!r:.20}, this runtime reads format "
                              f"{FORMAT_VERSION}{why}; {REEXPORT}")

    def positive_int(key: str) -> bool:
        value = metadata[key]
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if not positive_int("max_length") or metadata["max_length"] > MAX_LENGTH_LIMIT:
        raise RecboleLLMError(f"'{path}': max_length must be an integer from 1 to {MAX_LENGTH_LIMIT}, not "
                              f"{metadata['max_length']!r:.60}; {REEXPORT}")
    tokens = metadata["item_tokens"]
    if not isinstance(tokens, list) or len(tokens) < 2:
        what = f"{len(tokens)} entries" if isinstance(tokens, list) else type(tokens).__name__
        raise RecboleLLMError(f"'{path}': item_tokens must be a list of padding then item tokens (strings), not "
                              f"{what}; {REEXPORT}")
    strange = next((i for i, token in enumerate(tokens) if type(token) is not str), None)
    if strange is not None:
        raise RecboleLLMError(f"'{path}': item_tokens[{strange}] is {type(tokens[strange]).__name__} "
                              f"{tokens[strange]!r:.40}, not a string; {REEXPORT}")
    if len(set(tokens[1:])) != len(tokens) - 1:
        seen: set[str] = set()
        twice = next(token for token in tokens[1:] if token in seen or seen.add(token))
        raise RecboleLLMError(f"'{path}': item token '{shown(twice)}' is listed twice in item_tokens; {REEXPORT}")
    if metadata.get("top_k") is not None and (not positive_int("top_k") or metadata["top_k"] >= len(tokens)):
        raise RecboleLLMError(f"'{path}': top_k must be null or an integer from 1 to {len(tokens) - 1} (the "
                              f"items), not {metadata['top_k']!r:.60}; {REEXPORT}")
    if "n_items" in metadata and metadata["n_items"] != len(tokens):
        raise RecboleLLMError(f"'{path}' says n_items={metadata['n_items']!r:.60} but lists {len(tokens)} "
                              f"item_tokens; {REEXPORT}")
    return metadata


def _check_graph(session, model_path: Path, metadata_path: Path, metadata: dict[str, Any]) -> None:
    """The graph's inputs and outputs are those metadata.json describes, and the keys export also wrote into
    the graph's metadata_props (when they are there) agree with metadata.json."""
    top_k, n_tokens = metadata.get("top_k"), len(metadata["item_tokens"])
    inputs = [node.name for node in session.get_inputs()]
    outputs = {node.name: node.shape for node in session.get_outputs()}
    if "top_items" in outputs and "top_scores" in outputs:
        if top_k is None:
            raise RecboleLLMError(f"'{model_path}' returns top-k items (exported with --top-k) but "
                                  f"'{metadata_path}' has top_k null; {REEXPORT}")
        width = outputs["top_items"][1] if len(outputs["top_items"]) == 2 else None
        if isinstance(width, int) and width != top_k:
            raise RecboleLLMError(f"'{metadata_path}' has top_k={top_k} but '{model_path}' returns {width} items; "
                                  f"{REEXPORT}")
    elif "scores" in outputs:
        if top_k is not None:
            raise RecboleLLMError(f"'{model_path}' scores every item (exported without --top-k) but "
                                  f"'{metadata_path}' has top_k={top_k}; {REEXPORT}")
        width = outputs["scores"][1] if len(outputs["scores"]) == 2 else None
        if isinstance(width, int) and width != n_tokens:
            raise RecboleLLMError(f"'{metadata_path}' lists {n_tokens} item_tokens but '{model_path}' scores "
                                  f"{width} items; the two files come from different exports: {REEXPORT}")
    else:
        raise RecboleLLMError(f"'{model_path}' has neither a 'scores' output nor 'top_items' and 'top_scores' "
                              f"(outputs: {', '.join(outputs)}); it is not a recbole_llm export: {REEXPORT}")
    wanted = ["item_seq", "item_length"] + (["exclude_items"] if top_k is not None else [])
    if sorted(inputs) != sorted(wanted):
        raise RecboleLLMError(f"'{model_path}' takes inputs {', '.join(inputs)}, not {', '.join(wanted)}; it is not "
                              f"a recbole_llm export: {REEXPORT}")
    props = session.get_modelmeta().custom_metadata_map
    graph: dict[str, Any] = {}
    for key in ("max_length", "top_k", "n_items", "item_tokens"):
        if key in props:
            try:
                graph[key] = json.loads(props[key])
            except (ValueError, RecursionError):  # not written by recbole_llm's export: nothing to compare
                continue
    said = {"max_length": metadata["max_length"], "top_k": top_k, "n_items": n_tokens}
    for key, value in said.items():
        if key in graph and graph[key] != value:
            what = f"{n_tokens} item_tokens" if key == "n_items" else f"{key}={value!r}"
            raise RecboleLLMError(f"'{metadata_path}' has {what} but '{model_path}' was exported with "
                                  f"{key}={graph[key]!r:.60}; the two files come from different exports: {REEXPORT}")
    if "item_tokens" in graph and graph["item_tokens"] != metadata["item_tokens"]:
        raise RecboleLLMError(f"'{metadata_path}' lists other item_tokens than '{model_path}' was exported with; "
                              f"the two files come from different exports: {REEXPORT}")
