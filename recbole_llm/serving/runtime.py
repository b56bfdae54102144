"""Serving an exported artifact with ONNX Runtime: raw item tokens in, top-K raw item tokens out.

Needs only onnxruntime and numpy (no RecBole, no torch):

    from recbole_llm.serving.runtime import Recommender
    recommender = Recommender("artifacts/bertlora")
    [answer] = recommender.recommend([["242", "302", "377"]], k=10)
    answer.items, answer.scores, answer.unknown_tokens

Histories longer than the model's maximum length keep their most recent items. Unknown tokens follow
``unknown_tokens``: ``"skip"`` (default: dropped and counted in the answer) or ``"error"``. A history with
no known item left is an error.

An artifact exported with ``--item-index`` returns user vectors and keeps its item table in a file: the
runtime scores ``user_vectors @ item_vectors.T`` and ranks in numpy, and ``add_items({token: text})`` adds
items from their text alone (the artifact's text tower) to the loaded artifact; ``save`` writes it back,
atomically (``recbole-llm add-items``). Adding items needs the ``tokenizers`` package as well.

The artifact is checked when it is loaded, so that a bad one fails at start rather than at the first
request: ``metadata.json`` must be a JSON object with well-typed keys, ``model.onnx`` must load in ONNX
Runtime, and the two must agree (inputs and outputs, item count, ``top_k``, ``max_length``, and the keys
export also wrote into the graph's metadata_props); the graph's signature must vouch for metadata.json and
every companion file (each a regular file of the signed size, looked at before it is opened, and of the
signed SHA-256); then one history of ``max_length`` items is run.

``exclude_seen`` left out (None) follows the artifact: metadata.json's ``exclude_seen``, which export sets
from the training data's ``repeat_rate`` (false where users come back to items, as RecBole's evaluator
counts repeats as hits). Explanations are scored in bounded chunks.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from recbole_llm.errors import RecboleLLMError
from recbole_llm.artifact import contract
from recbole_llm.artifact.contract import (FORMAT_VERSION, REEXPORT, exclusions, first_line,  # noqa: F401 (re-exported)
                                         shown)

UNKNOWN_TOKEN_POLICIES = ("skip", "error")
RETRIEVALS = ("exact", "ann")
# faiss IVF over the item table (inner product): about 4 sqrt(n) k-means lists, at least 39 items each (what
# faiss's k-means asks), and a tenth of them probed per query, or enough lists to scan 4096 items (so a
# small catalogue is searched whole). Chosen on benchmarks/catalogue_scale.py's
# 100k-item catalogue, where HNSW (M=32) reached Recall@10 0.90 at efSearch 256 and 0.98 only at 1024 (3.3 ms a
# query), this 0.99 at 1.4 ms; its results give Recall@10 and the speed-up at every size.
ANN_LISTS_PER_SQRT, ANN_MIN_LIST, ANN_PROBED, ANN_MIN_SCANNED = 4, 39, 0.1, 4096
MAX_ITEM_TEXT_CHARS = 10_000  # characters of one new item's text (the tower reads its first max_tokens tokens)
MAX_TOKEN_CHARS = 1000  # characters of a new item's token
TEXT_CHUNK = 256  # item texts per text-tower call
# explanations are scored in chunks: histories per model call, and scores (histories x items) per call of a
# graph that scores every item, so an explained request's memory does not grow with its size
EXPLAIN_CHUNK_ROWS = 256
EXPLAIN_CHUNK_SCORES = 1 << 22


def valid_unicode(text: str) -> bool:
    """Valid Unicode: no lone UTF-16 surrogate (from a JSON escape or a bad decode)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_new_token(token: Any) -> str:
    """A new item's token as a string: non-empty, printable (no tab, newline or control character), no
    surrounding spaces (" 50" would be another item than "50"), valid Unicode, at most MAX_TOKEN_CHARS, and
    not the padding token; else RecboleLLMError."""
    if not _is_token(token) or not str(token):
        raise RecboleLLMError(f"item token {shown(repr(token))} must be a non-empty string")
    text = str(token)
    if not valid_unicode(text) or not text.isprintable() or text != text.strip():
        raise RecboleLLMError(f"item token '{shown(text)}' has surrounding spaces, a control character or a lone "
                              "surrogate; item tokens are printable text without surrounding spaces")
    if len(text) > MAX_TOKEN_CHARS:
        raise RecboleLLMError(f"item token '{shown(text)}' is longer than {MAX_TOKEN_CHARS} characters")
    if text == contract.PADDING_TOKEN:
        raise RecboleLLMError(f"'{contract.PADDING_TOKEN}' is the padding token (internal id 0), not an item; "
                              "choose another token")
    return text


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
class Contribution:
    """How much one history item the model read pushed a recommended item up."""

    item: str  # the history item (raw token)
    effect: float | None  # the recommended item's score minus its score with this item removed from the
    # history; None for a one-item history (nothing is left to score without it)


@dataclass
class Recommendation:
    items: list[str]
    scores: list[float]
    unknown_tokens: int  # tokens of this history that the model does not know (skipped)
    # with explain: for each recommended item, the history items the model read, largest effect first
    explanations: list[list[Contribution]] | None = None


class Catalogue(NamedTuple):
    """The items an artifact knows, replaced as a whole when items are added: a call reads it once."""

    tokens: list[str]  # internal id -> raw token; 0 is padding
    token_to_id: dict[str, int]
    vectors: np.ndarray | None  # float32 [len(tokens), dim] of an item-index artifact, else None


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


def usable_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (``docker --cpus``,
    Kubernetes CPU limits), rounded up; not the host's count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def session_options(intra_op_threads: int | None = None):
    """(onnxruntime.SessionOptions, the settings as a dict): what every session of an artifact runs with, set
    here so the runtime, the service and the benchmarks measure the same thing.

    One intra-op thread per usable core (``intra_op_threads`` to override; ONNX Runtime's default counts
    the host's cores, not a container's share), operators run one after another (the graph is a chain:
    inter-op parallelism only adds threads), every graph optimization, and the CPU memory arena on (buffers
    reused across calls)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or usable_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = True
    settings = {"intra_op_num_threads": options.intra_op_num_threads, "inter_op_num_threads": 1,
                "execution_mode": "sequential", "graph_optimization_level": "all", "cpu_mem_arena": True}
    return options, settings


class Recommender:
    """An exported artifact loaded in ONNX Runtime (CUDA when available, else CPU)."""

    def __init__(
        self,
        artifact: str | Path,
        providers: Sequence[str] | None = None,
        unknown_tokens: str = "skip",
        intra_op_threads: int | None = None,
        retrieval: str = "exact",
    ):
        """Load and check ``artifact``. ``retrieval``: ``exact`` (every item scored) or ``ann`` (an artifact
        exported with --item-index: a faiss IVF index over its item table, built here; needs faiss-cpu).
        Raises ArtifactError for a broken artifact, RecboleLLMError for bad arguments."""
        import onnxruntime as ort

        folder = Path(artifact)
        model_path, metadata_path = folder / contract.MODEL_FILE, folder / contract.METADATA_FILE
        if not os.path.lexists(model_path) and not os.path.lexists(metadata_path):
            raise contract.ArtifactError(
                f"'{folder}' is not an exported artifact (needs {contract.MODEL_FILE} and {contract.METADATA_FILE}); "
                "create one with: recbole-llm export --checkpoint CHECKPOINT --output FOLDER"
            )
        for path in (metadata_path, model_path):  # regular files, looked at before anything opens them
            contract.check_regular(path)
        if unknown_tokens not in UNKNOWN_TOKEN_POLICIES:
            raise RecboleLLMError(f"unknown_tokens '{unknown_tokens}' is not a policy; use 'skip' or 'error'")
        most = 4 * (os.cpu_count() or 1)  # ONNX Runtime would create them all (thousands took GBs and hung)
        if intra_op_threads is not None and (
                isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int)
                or not 1 <= intra_op_threads <= most):
            raise RecboleLLMError(f"intra_op_threads={intra_op_threads!r:.30} must be a number of threads from 1 to "
                                  f"{most} (4 per core), or None: all cores")
        if retrieval not in RETRIEVALS:
            raise RecboleLLMError(f"retrieval {retrieval!r:.40} is not supported; use 'exact' or 'ann'")
        self.metadata = contract.read_metadata(metadata_path)
        self.unknown_tokens = unknown_tokens
        self.max_length = self.metadata["max_length"]
        self.top_k = self.metadata.get("top_k")
        # the served default of exclude_seen, from the training data's repeat rate (export/README.md)
        self.exclude_seen = self.metadata.get("exclude_seen", True)
        self.repeat_rate = self.metadata.get("repeat_rate")
        self.folder = folder
        # an artifact exported with --item-index: the item table is a file, and items can be added
        self.item_index = self.metadata.get("item_index")
        self.text_tower = self.metadata.get("text_tower")
        if retrieval == "ann" and self.item_index is None:
            raise RecboleLLMError("retrieval='ann' searches an item index: export the model with --item-index")
        self._text_session = None  # (tokenizer, ONNX Runtime session) of the text tower
        self._adding = threading.Lock()
        self.retrieval = retrieval
        self._ann_lock = threading.Lock()  # faiss: no search while items are added
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        if isinstance(providers, (str, bytes)) or not all(isinstance(p, str) for p in providers) or not providers:
            raise RecboleLLMError(f"providers must be a non-empty list of ONNX Runtime provider names, e.g. "
                                  f"['CPUExecutionProvider'], not {providers!r:.60}")
        unavailable = [p for p in providers if p not in available]
        if unavailable:  # ONNX Runtime would fall back to another provider without a word
            raise RecboleLLMError(f"provider '{shown(unavailable[0])}' is not available here; available: "
                                  f"{', '.join(available)}")
        options, self.session_settings = session_options(intra_op_threads)
        self._providers, self._threads = list(providers), intra_op_threads
        # the bytes ONNX Runtime loads are the bytes hashed: save() refuses a model.onnx changed since
        model_bytes = contract.read_regular(model_path)
        self._model_sha256 = contract.file_record(model_bytes)["sha256"]
        try:
            self.session = ort.InferenceSession(bytes(model_bytes), options, providers=list(providers))
        except Exception as error:  # noqa: BLE001 - ONNX Runtime's errors share no public base class
            raise contract.ArtifactError(
                f"ONNX Runtime cannot load '{model_path}' ({first_line(error)}); if the file is truncated or "
                f"corrupt, {REEXPORT}") from None
        del model_bytes
        # the graph vouches for metadata.json and every companion file: each is a regular file of the signed
        # size (looked at before it is opened) whose digest is the signed one, read once, and used as read
        self.signed_files = contract.check_graph(
            [node.name for node in self.session.get_inputs()],
            {node.name: node.shape for node in self.session.get_outputs()},
            self.session.get_modelmeta().custom_metadata_map, self.metadata, model_path, metadata_path)
        tokens = self.metadata["item_tokens"]
        vectors = (contract.read_item_vectors(folder, self.metadata, self.signed_files[contract.ITEM_VECTORS_FILE])
                   if self.item_index else None)
        self._catalogue = Catalogue(tokens, {token: index for index, token in enumerate(tokens) if index}, vectors)
        if self.text_tower:  # loaded and checked now, not at the first item added (a service would start, then fail)
            self._text_session = self._load_text_tower(
                contract.read_companion(folder, contract.TOKENIZER_FILE, self.signed_files[contract.TOKENIZER_FILE]),
                contract.read_companion(folder, contract.TEXT_TOWER_FILE, self.signed_files[contract.TEXT_TOWER_FILE]))
        self._ann = self._build_ann(self.item_vectors) if retrieval == "ann" else None
        self._probe(model_path, metadata_path)
        if self.text_tower:
            self.vectors_from_text(["probe " * self.text_tower["max_tokens"]])

    @property
    def tokens(self) -> list[str]:
        """Internal item id -> raw item token (0 is padding), items added included."""
        return self._catalogue.tokens

    @property
    def token_to_id(self) -> dict[str, int]:
        return self._catalogue.token_to_id

    @property
    def item_vectors(self) -> np.ndarray | None:
        """The item table float32 [n_items, dim] of an item-index artifact (items added included), else None."""
        return self._catalogue.vectors

    def _probe(self, model_path: Path, metadata_path: Path) -> None:
        """One history of ``max_length`` items through the graph: it runs, and its outputs have the shapes and
        item ids that metadata.json describes."""
        import onnxruntime as ort

        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # the failure is reported below, in one line
        feeds = self._feeds(np.ones((1, self.max_length)), np.array([self.max_length]))
        names = contract.output_names(self.top_k, self.item_index is not None)
        try:
            outputs = self.session.run(names, feeds, quiet)
        except Exception as error:  # noqa: BLE001
            raise contract.ArtifactError(
                f"'{model_path}' fails on a history of max_length={self.max_length} items ({first_line(error)}); "
                f"'{metadata_path}' must hold the max_length the model was exported with, or {REEXPORT}") from None
        width = (self.item_index["dim"] if self.item_index else len(self.tokens) if self.top_k is None
                 else self.top_k)
        if outputs[0].shape != (1, width):
            raise contract.ArtifactError(
                f"'{model_path}' returns {names[0]} of shape {list(outputs[0].shape)} for one history, but "
                f"'{metadata_path}' says [1, {width}]; {REEXPORT}")
        if self.top_k is not None and not ((outputs[0] >= 0) & (outputs[0] < len(self.tokens))).all():
            raise contract.ArtifactError(
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
        self, histories: Sequence[Sequence[str]], k: int = 10, exclude_seen: bool | None = None,
        explain: bool = False
    ) -> list[Recommendation]:
        """The top ``k`` items for each history (raw item tokens, oldest first). ``exclude_seen`` drops the
        history's items from the answer; None (default): the artifact's ``exclude_seen`` (true unless the
        training data repeats items, see ``repeat_rate``). With ``explain``, each answer also says, for each
        recommended item, how much each history item the model read contributed: the score change when that
        item is left out of the history (scored in bounded chunks; needs an artifact that scores every item).
        Raises RecboleLLMError for bad input."""
        self.check_k(k)
        self.check_explain(explain)
        if exclude_seen is None:
            exclude_seen = self.exclude_seen
        if not isinstance(exclude_seen, (bool, np.bool_)):
            raise RecboleLLMError(f"exclude_seen must be True, False or None, not {type(exclude_seen).__name__}")
        encoded = self.encode(histories)
        rows = len(encoded.item_seq)
        return self.rank(encoded, [k] * rows, [bool(exclude_seen)] * rows, [explain] * rows)

    def check_explain(self, explain: bool) -> None:
        if not isinstance(explain, (bool, np.bool_)):
            raise RecboleLLMError(f"explain must be True or False, not {type(explain).__name__}")
        if explain and self.top_k is not None:
            raise RecboleLLMError(
                f"explanations need every item's score, and this artifact returns only its top {self.top_k}: "
                "export it without --top-k to explain recommendations")

    def rank(self, encoded: Encoded, ks: Sequence[int], exclude_seen: Sequence[bool],
             explain: Sequence[bool] | None = None) -> list[Recommendation]:
        """Encoded rows (``encode``, or several concatenated with :meth:`Encoded.join`) to answers in one
        ONNX Runtime call; k, exclude_seen and explain per row, so rows of different requests can share the
        call. ``exclude_seen`` drops every item of the row's history, not only the model's window."""
        answers = self._rank(encoded, ks, exclude_seen)
        if explain is not None and any(explain):
            self._explain(encoded, answers, explain)
        return answers

    @staticmethod
    def explain_rows(encoded: Encoded, explain: Sequence[bool]) -> int:
        """The model rows explaining costs: each explained history, and it once without each item the model
        reads (items read + 1; a one-item history has nothing to leave out: 1). What the service limits
        (``--max-explained``): the model's time and memory grow with it."""
        return sum(int(length) + 1 if length > 1 else 1 for length, wanted in zip(encoded.item_length, explain)
                   if wanted)

    @staticmethod
    def explain_effects(encoded: Encoded, ks: Sequence[int], explain: Sequence[bool]) -> int:
        """The effects an explained answer reports: k recommended items x the items the model reads, per
        history; the answer's size grows with it."""
        return sum(int(length) * int(k) for length, k, wanted in zip(encoded.item_length, ks, explain) if wanted)

    def _explain(self, encoded: Encoded, answers: list[Recommendation], explain: Sequence[bool]) -> None:
        """Leave-one-out effects: every history, and it with each of its window's items removed, scored in
        chunks of at most EXPLAIN_CHUNK_ROWS histories (and EXPLAIN_CHUNK_SCORES scores); of each chunk only
        the recommended items' scores are kept, so memory stays flat however many rows a request adds."""
        catalogue = self._catalogue  # ids of recommended items stay valid: items are only ever appended
        rows = [row for row, wanted in enumerate(explain) if wanted]
        targets = {row: np.array([catalogue.token_to_id[token] for token in answers[row].items], dtype=np.int64)
                   for row in rows}
        scored: list[tuple[int, int]] = []  # (row, position left out; -1: the whole history)
        for row in rows:
            scored.append((row, -1))
            length = int(encoded.item_length[row])
            if length >= 2:
                scored.extend((row, position) for position in range(length))
        per_call = EXPLAIN_CHUNK_ROWS
        if catalogue.vectors is None:  # the graph returns every item's score: rows x items floats a call
            per_call = max(1, min(per_call, EXPLAIN_CHUNK_SCORES // len(catalogue.tokens)))
        picked: dict[tuple[int, int], np.ndarray] = {}
        for start in range(0, len(scored), per_call):
            chunk = scored[start : start + per_call]
            lengths = [int(encoded.item_length[row]) - (position >= 0) for row, position in chunk]
            item_seq = np.zeros((len(chunk), max(lengths)), dtype=np.int64)  # as wide as this chunk needs
            for index, (row, position) in enumerate(chunk):
                window = encoded.item_seq[row, : int(encoded.item_length[row])]
                item_seq[index, : lengths[index]] = window if position < 0 else np.delete(window, position)
            item_length = np.asarray(lengths, dtype=np.int64)
            if catalogue.vectors is None:
                scores = self._scores(item_seq, item_length, None)
                for index, key in enumerate(chunk):
                    picked[key] = scores[index, targets[key[0]]]
            else:  # only the recommended items' rows of the table: no item-count factor
                users = self._user_vectors(item_seq, item_length, catalogue.vectors)
                for index, key in enumerate(chunk):
                    picked[key] = catalogue.vectors[targets[key[0]]] @ users[index]
            del item_seq
        for row in rows:
            answer = answers[row]
            length = int(encoded.item_length[row])
            window = encoded.item_seq[row, :length]
            if length < 2:  # nothing is left to score without the one item
                answer.explanations = [[Contribution(self.tokens[int(window[0])], None)] for _ in answer.items]
                continue
            full = picked[(row, -1)]
            effects = full[None, :] - np.stack([picked[(row, position)] for position in range(length)])  # [L, k]
            explanations = []
            for column in range(len(answer.items)):
                order = np.argsort(-effects[:, column], kind="stable")  # largest first, earlier position on ties
                explanations.append([Contribution(self.tokens[int(window[position])], float(effects[position, column]))
                                     for position in order])
            answer.explanations = explanations

    def _feeds(self, item_seq: np.ndarray, item_length: np.ndarray,
               exclude_items: np.ndarray | None = None) -> dict[str, np.ndarray]:
        feeds = contract.feeds(item_seq, item_length, exclude_items, self.top_k)
        if self.item_vectors is not None:
            feeds[contract.ITEM_VECTORS] = self.item_vectors
        return feeds

    def _scores(self, item_seq: np.ndarray, item_length: np.ndarray, vectors: np.ndarray | None = None) -> np.ndarray:
        """Every item's score, float32 [rows, n_items], from a graph without top-k (``vectors``: the item
        table of the catalogue the call reads)."""
        if vectors is None:
            vectors = self.item_vectors
        if vectors is None:
            (scores,) = self.session.run(contract.output_names(None), contract.feeds(item_seq, item_length))
            return scores
        return contract.item_scores(self._user_vectors(item_seq, item_length, vectors), vectors)

    def _user_vectors(self, item_seq: np.ndarray, item_length: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """The graph's user vectors [rows, dim]. The graph only looks rows of ``item_vectors`` up, so it gets
        the rows of the items these histories hold (padding first) and ids into them: its cost does not grow
        with the catalogue."""
        used, positions = np.unique(np.concatenate([[0], item_seq.ravel()]), return_inverse=True)
        feeds = {**contract.feeds(positions[1:].reshape(item_seq.shape), item_length),
                 contract.ITEM_VECTORS: np.ascontiguousarray(vectors[used])}
        (user_vectors,) = self.session.run(contract.output_names(None, True), feeds)
        return user_vectors

    def _rank(self, encoded: Encoded, ks: Sequence[int], exclude_seen: Sequence[bool]) -> list[Recommendation]:
        catalogue = self._catalogue  # one catalogue for the whole call, even if items are added meanwhile
        k_max = max(ks)
        exclude_items = exclusions(encoded.seen, exclude_seen)
        if self.top_k is not None:
            feeds = contract.feeds(encoded.item_seq, encoded.item_length, exclude_items, self.top_k)
            top_items, top_scores = self.session.run(contract.output_names(self.top_k), feeds)
            top_items, top_scores = top_items[:, :k_max], top_scores[:, :k_max]
        elif self._ann is not None:
            user_vectors = self._user_vectors(encoded.item_seq, encoded.item_length, catalogue.vectors)
            top_items, top_scores = self._ann_top_k(user_vectors, k_max, exclude_items, catalogue.vectors)
        else:  # the same exclusions and ordering as a top-k graph, in numpy
            scores = self._scores(encoded.item_seq, encoded.item_length, catalogue.vectors)
            top_items, top_scores = contract.top_k(scores, k_max, exclude_items)
        if not ((top_items >= 0) & (top_items < len(catalogue.tokens))).all():  # never past the token list
            raise contract.ArtifactError(
                f"the model returned item ids beyond the {len(catalogue.tokens)} item_tokens of its metadata.json: the "
                f"artifact's files come from different exports; {REEXPORT}")
        answers = []
        for items, scores_row, k, unknown in zip(top_items, top_scores, ks, encoded.unknown):
            items, scores_row = items[:k], scores_row[:k]
            finite = np.isfinite(scores_row)  # fewer than k recommendable items left after exclusions
            answers.append(Recommendation(
                items=[catalogue.tokens[i] for i in items[finite]],
                scores=[float(s) for s in scores_row[finite]],
                unknown_tokens=int(unknown),
            ))
        return answers

    # --- approximate retrieval: retrieval="ann" ------------------------------------------------------------

    @staticmethod
    def _build_ann(vectors: np.ndarray):
        """A faiss IVF index (inner product, exact vectors in the lists) over the item table, padding left out:
        faiss id i is item i + 1. Returns (index, lists probed per query)."""
        try:
            import faiss
        except ImportError:
            raise RecboleLLMError("retrieval='ann' needs faiss: pip install faiss-cpu") from None
        faiss.omp_set_num_threads(usable_cores())
        items = np.ascontiguousarray(vectors[1:], dtype=np.float32)
        if len(items) <= ANN_MIN_SCANNED:  # searched whole anyway: a flat index, no clustering
            index = faiss.IndexFlatIP(items.shape[1])
            index.add(items)
            return index, None
        lists = max(1, min(int(ANN_LISTS_PER_SQRT * len(items) ** 0.5), len(items) // ANN_MIN_LIST))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(items.shape[1]), items.shape[1], lists,
                                   faiss.METRIC_INNER_PRODUCT)
        # k-means on a sample of 64 items a list (faiss samples 256 a list itself): a 1M-item catalogue took
        # 950 s to index on 2 busy cores otherwise; the lists then take every item
        sample = np.random.default_rng(0).choice(len(items), size=min(len(items), 64 * lists), replace=False)
        index.train(items[np.sort(sample)])
        index.add(items)
        per_list = len(items) / lists
        return index, min(lists, max(1, round(ANN_PROBED * lists), int(np.ceil(ANN_MIN_SCANNED / per_list))))

    def _ann_top_k(self, user_vectors: np.ndarray, k: int, exclude_items: np.ndarray,
                   vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(items int64, scores float32) [rows, k] from the index: k plus as many as a row excludes are searched,
        excluded ones and items past the call's catalogue (``vectors``: items added meanwhile are not in it)
        dropped, ties at equal score lower id first; -inf where fewer were found. Scores are exact."""
        import faiss

        n_items = len(vectors)
        excluded = [set(row[row > 0].tolist()) for row in exclude_items]
        width = min(n_items - 1, k + max(len(row) for row in excluded))
        index, probed = self._ann
        params = None if probed is None else faiss.SearchParametersIVF(nprobe=probed)
        with self._ann_lock:
            _, ids = index.search(np.ascontiguousarray(user_vectors, dtype=np.float32), width, params=params)
        items = np.zeros((len(ids), k), dtype=np.int64)
        top = np.full((len(ids), k), -np.inf, dtype=np.float32)
        for row, found in enumerate(ids + 1):
            keep = np.array([i for i in found.tolist() if 0 < i < n_items and i not in excluded[row]], dtype=np.int64)
            if not len(keep):
                continue
            scores = vectors[keep] @ user_vectors[row]
            order = np.lexsort((keep, -scores))[:k]
            items[row, : len(order)], top[row, : len(order)] = keep[order], scores[order]
        return items, top

    # --- a living catalogue: artifacts exported with --item-index ---------------------------------------

    def add_items(self, items: Mapping[str, str | Mapping[str, str]]) -> list[int]:
        """Add items to this loaded artifact from their text alone: ``{token: text}``, where text is a string
        (the item's text fields joined by ", ", as the model read them at training) or ``{field: value}`` of
        the artifact's ``item_text_fields``. Each new item's vector comes from the artifact's text tower; new
        items are recommended and may appear in histories at once. Returns their internal ids. Raises
        RecboleLLMError (nothing added) for an artifact without an item index or text tower, an empty
        mapping, a token already in the artifact or given twice, or an item without text."""
        if self.item_index is None:
            raise RecboleLLMError("this artifact's item table is inside its graph: export it with --item-index to "
                                  "add items")
        if not self.text_tower:
            raise RecboleLLMError("this artifact's model has no item text (item_repr id), so a new item has no "
                                  "representation: train with item_repr text or id+text to add items from text")
        if not isinstance(items, Mapping) or not items:
            raise RecboleLLMError("items must be a non-empty mapping of new item tokens to their text, e.g. "
                                  "{'1683': 'Toy Story 3 (2010), Animation Children'}")
        tokens, texts = [], []
        for token, text in items.items():
            token = check_new_token(token)
            if token in self.token_to_id:
                raise RecboleLLMError(f"item '{shown(token)}' is already in the artifact (internal id "
                                      f"{self.token_to_id[token]}); new items need new tokens")
            if token in tokens:
                raise RecboleLLMError(f"item '{shown(token)}' is given twice; give each new item once")
            tokens.append(token)
            texts.append(self._item_text(token, text))
        with self._adding:  # one writer at a time; readers keep using the table they started with
            if any(token in self.token_to_id for token in tokens):
                raise RecboleLLMError(f"item '{shown(next(t for t in tokens if t in self.token_to_id))}' was added "
                                      "meanwhile; new items need new tokens")
            new = self.vectors_from_text(texts)
            old = self._catalogue
            first = len(old.tokens)
            token_to_id = dict(old.token_to_id)
            token_to_id.update({token: first + offset for offset, token in enumerate(tokens)})
            vectors = np.concatenate([old.vectors, new])
            if self._ann is not None:  # the index first: a call that finds these ids before it reads the
                with self._ann_lock:   # new catalogue drops them (past its table)
                    self._ann[0].add(new)  # into their nearest lists; faiss ids follow the table's rows
            self._catalogue = Catalogue(old.tokens + tokens, token_to_id, vectors)
        return list(range(first, first + len(tokens)))

    def _item_text(self, token: str, text: Any) -> str:
        fields = self.text_tower["item_text_fields"]
        if isinstance(text, Mapping):
            unknown = [name for name in text if name not in fields]
            if unknown:
                raise RecboleLLMError(f"item '{shown(token)}': field '{shown(str(unknown[0]))}' is not one of the "
                                      f"model's text fields {fields}")
            if not all(isinstance(value, str) for value in text.values()):
                raise RecboleLLMError(f"item '{shown(token)}': text field values must be strings")
            text = ", ".join(text[name].strip() for name in fields if name in text and text[name].strip())
        if not isinstance(text, str):
            raise RecboleLLMError(f"item '{shown(token)}': its text must be a string or a mapping of {fields} to "
                                  f"strings, not {type(text).__name__}")
        if not valid_unicode(text):
            raise RecboleLLMError(f"item '{shown(token)}': its text holds a lone UTF-16 surrogate; send valid Unicode")
        if not text.strip():
            raise RecboleLLMError(f"item '{shown(token)}' has no text; a new item's representation comes from its "
                                  f"text ({', '.join(fields)})")
        if len(text) > MAX_ITEM_TEXT_CHARS:
            raise RecboleLLMError(f"item '{shown(token)}': its text has {len(text)} characters, more than "
                                  f"{MAX_ITEM_TEXT_CHARS}; shorten it")
        return text.strip()

    def vectors_from_text(self, texts: Sequence[str]) -> np.ndarray:
        """Item vectors float32 [len(texts), dim] from item texts, through the artifact's text tower, in chunks
        of ``TEXT_CHUNK`` texts (memory stays flat however many items are added)."""
        tokenizer, session = self._text_tower()
        parts = []
        for start in range(0, len(texts), TEXT_CHUNK):
            encodings = tokenizer.encode_batch(list(texts[start : start + TEXT_CHUNK]))
            input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
            attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            try:
                (vectors,) = session.run([contract.ITEM_VECTORS], {contract.TEXT_INPUT_IDS: input_ids,
                                                                   contract.TEXT_ATTENTION_MASK: attention_mask})
            except Exception as error:  # noqa: BLE001 - ONNX Runtime's errors share no public base class
                raise contract.ArtifactError(f"'{self.folder / contract.TEXT_TOWER_FILE}' fails on item text "
                                             f"({first_line(error)}); {REEXPORT}") from None
            if vectors.shape != (len(encodings), self.item_index["dim"]) or not np.isfinite(vectors).all():
                raise contract.ArtifactError(f"'{self.folder / contract.TEXT_TOWER_FILE}' returned item vectors of "
                                             f"shape {list(vectors.shape)} or non-finite values; {REEXPORT}")
            parts.append(vectors.astype(np.float32))
        return np.concatenate(parts)

    def _text_tower(self):
        return self._text_session

    def _load_text_tower(self, tokenizer_json: bytes, tower: bytes):
        """(tokenizer, ONNX Runtime session) of the text tower, from its verified bytes."""
        import onnxruntime as ort

        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise RecboleLLMError("adding items needs the tokenizers package: pip install tokenizers") from None
        try:
            tokenizer = Tokenizer.from_str(bytes(tokenizer_json).decode("utf-8"))
        except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise contract.ArtifactError(f"'{self.folder / contract.TOKENIZER_FILE}' is not a tokenizer "
                                         f"({first_line(error)}); {REEXPORT}") from None
        tokenizer.enable_truncation(self.text_tower["max_tokens"])  # as the model read item text
        options, _ = session_options(self._threads)
        path = self.folder / contract.TEXT_TOWER_FILE
        try:
            session = ort.InferenceSession(bytes(tower), options, providers=self._providers)
        except Exception as error:  # noqa: BLE001
            raise contract.ArtifactError(f"ONNX Runtime cannot load '{path}' ({first_line(error)}); "
                                         f"{REEXPORT}") from None
        inputs, want = sorted(node.name for node in session.get_inputs()), [s.name for s in contract.text_tower_specs()[0]]
        outputs = [node.name for node in session.get_outputs()]
        if inputs != sorted(want) or outputs != [contract.ITEM_VECTORS]:
            raise contract.ArtifactError(f"'{path}' takes {inputs} and returns {outputs}, not a text tower's "
                                         f"{want} -> ['{contract.ITEM_VECTORS}']; {REEXPORT}")
        return tokenizer, session

    def save(self, output: str | Path, replace: bool = False) -> Path:
        """Write this artifact, items added included, to the folder ``output``: into a new folder beside it,
        renamed into place when whole (a reader sees the old artifact or the new one). ``output`` must not
        exist unless ``replace`` (then it must be an artifact); replacing the folder this artifact was loaded
        from is refused if another update wrote it meanwhile (its item table changed since the load: load it
        again). Writers of one folder take turns (a lock file beside it). Returns the folder."""
        if self.item_index is None:
            raise RecboleLLMError("only an artifact exported with --item-index changes after export; nothing to save")
        output = Path(output).resolve()
        source = self.folder.resolve()
        if source in output.parents:
            raise RecboleLLMError(f"'{output}' is inside the artifact '{source}'; choose a folder outside it")
        if output.exists() and not (replace and (output / contract.METADATA_FILE).is_file()):
            raise RecboleLLMError(f"'{output}' exists; choose a new folder, or replace an artifact (save(..., "
                                  "replace=True); recbole-llm add-items without --output)")
        tokens, _, vectors = self._catalogue
        staging = None
        try:
            with _folder_lock(output):
                if output == source and self._changed_on_disk():
                    raise RecboleLLMError(f"'{output}' changed since it was loaded (another update wrote it); load "
                                          "it again and add the items again")
                # what was loaded, read again and checked against what was loaded: a file changed on disk
                # since (another writer, a hand edit) is refused, not copied under a new signature
                model = contract.read_regular(self.folder / contract.MODEL_FILE)
                if contract.file_record(model)["sha256"] != self._model_sha256:
                    raise RecboleLLMError(f"'{self.folder / contract.MODEL_FILE}' changed since it was loaded; load "
                                          "the artifact again and add the items again")
                kept = {name: contract.read_companion(self.folder, name, self.signed_files[name])
                        for name in (contract.TEXT_TOWER_FILE, contract.TOKENIZER_FILE) if name in self.signed_files}
                staging = contract.staging_folder(output)
                for name, data in kept.items():
                    (staging / name).write_bytes(data)
                np.save(staging / contract.ITEM_VECTORS_FILE, vectors, allow_pickle=False)
                table = contract.read_regular(staging / contract.ITEM_VECTORS_FILE)
                files = {name: contract.file_record(data) for name, data in kept.items()}
                files[contract.ITEM_VECTORS_FILE] = contract.file_record(table)
                del table
                metadata = dict(self.metadata, item_tokens=tokens, n_items=len(tokens))
                metadata["item_index"] = dict(self.item_index, sha256=files[contract.ITEM_VECTORS_FILE]["sha256"])
                metadata["items_added"] = (self.metadata.get("items_added", 0) + len(tokens)
                                           - len(self.metadata["item_tokens"]))
                contract.check_metadata(metadata, staging / contract.METADATA_FILE)
                # the graph signs the grown catalogue: its metadata_props are rewritten, the graph kept as it is
                signed = contract.signed_graph(model, metadata, files)
                (staging / contract.MODEL_FILE).write_bytes(signed)
                (staging / contract.METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
                contract.replace_folder(staging, output)
        except OSError as error:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise RecboleLLMError(f"could not write '{output}': {error.strerror or error}; nothing was changed; "
                                  "choose a writable folder") from None
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if output == source:  # what is on disk now is this artifact
            self.metadata, self.item_index, self.signed_files = metadata, metadata["item_index"], files
            self._model_sha256 = contract.file_record(signed)["sha256"]
        return output

    def _changed_on_disk(self) -> bool:
        try:
            on_disk = json.loads(bytes(contract.read_regular(self.folder / contract.METADATA_FILE)))
            return on_disk["item_index"]["sha256"] != self.item_index["sha256"]
        except (OSError, ValueError, KeyError, TypeError, RecboleLLMError):
            return True


def _folder_lock(output: Path):
    """An exclusive lock on ``.<name>.lock`` beside ``output`` (fcntl; a no-op where fcntl is missing)."""
    import contextlib

    @contextlib.contextmanager
    def held():
        try:
            import fcntl
        except ImportError:  # not POSIX
            yield
            return
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output.parent / f".{output.name}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    return held()


def read_items_file(path: str | Path, fields: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
    """New items from a tab-separated file with a header (RecBole's .item format works: ``item_id:token``,
    ``movie_title:token_seq`` ...): the first column is the item token, the others its fields; with
    ``fields`` (the model's text fields) only those columns are kept, and the header must name one.
    Returns ``{token: {field: value}}`` for :meth:`Recommender.add_items`; RecboleLLMError for an unreadable
    file, no header or rows, a row of another width, or a token listed twice (naming the line)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise RecboleLLMError(f"items file '{path}' is not a regular file; pass a tab-separated file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or first_line(error)
        raise RecboleLLMError(f"cannot read items file '{path}' ({reason}); pass a UTF-8 tab-separated file") from None
    # lines end at \n (or \r\n) only: a title may hold other characters Python counts as line breaks
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    rows = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if len(rows) < 2:
        raise RecboleLLMError(f"items file '{path}' needs a header (item token, then text fields, tab-separated) "
                              "and at least one item")
    header = [name.split(":")[0].strip() for name in rows[0][1].split("\t")]
    if len(header) < 2 or not all(header):
        raise RecboleLLMError(f"items file '{path}', line {rows[0][0]}: the header must name the item token column "
                              "and at least one text field, tab-separated, e.g. item_id<TAB>movie_title<TAB>class")
    twice = next((name for i, name in enumerate(header) if name in header[:i]), None)
    if twice is not None:
        raise RecboleLLMError(f"items file '{path}', line {rows[0][0]}: column '{shown(twice)}' is named twice")
    if fields is not None and not set(header[1:]) & set(fields):
        raise RecboleLLMError(f"items file '{path}': the header names none of the model's text fields "
                              f"{list(fields)} (it has {header[1:]}); name the text columns as the model's item file did")
    items: dict[str, dict[str, str]] = {}
    for number, line in rows[1:]:
        values = line.split("\t")
        if len(values) != len(header):
            raise RecboleLLMError(f"items file '{path}', line {number}: {len(values)} tab-separated values, the "
                                  f"header has {len(header)}")
        token = values[0].strip()
        try:
            check_new_token(token)
        except RecboleLLMError as error:
            raise RecboleLLMError(f"items file '{path}', line {number}: {error}") from None
        if token in items:
            raise RecboleLLMError(f"items file '{path}', line {number}: item '{shown(token)}' is listed twice")
        items[token] = {name: value for name, value in zip(header[1:], values[1:])
                        if fields is None or name in fields}
    return items
