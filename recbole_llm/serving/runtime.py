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

The class delegates to one module per idea: :mod:`~recbole_llm.serving.sessions` (ONNX Runtime options),
:mod:`~recbole_llm.serving.ann` (approximate retrieval), :mod:`~recbole_llm.serving.explain` (explanations)
and :mod:`~recbole_llm.serving.catalogue` (items added by their text, and saving); its records (encoded
histories, answers) are in :mod:`~recbole_llm.serving.records`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from recbole_llm.errors import ArtifactError, InputError, RecboleLLMError, first_line, shown
from recbole_llm.artifact import files, ranking, spec
from recbole_llm.artifact.metadata import check_graph, read_metadata
from recbole_llm.artifact.spec import REEXPORT
from recbole_llm.serving import catalogue as living, explain as explaining
from recbole_llm.serving.ann import AnnIndex
from recbole_llm.serving.catalogue import TextTower
from recbole_llm.serving.records import Catalogue, Encoded, Recommendation
from recbole_llm.serving.sessions import session_options
from recbole_llm.serving.tokens import is_sequence, is_token

UNKNOWN_TOKEN_POLICIES = ("skip", "error")
RETRIEVALS = ("exact", "ann")


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
        model_path, metadata_path = folder / spec.MODEL_FILE, folder / spec.METADATA_FILE
        if not os.path.lexists(model_path) and not os.path.lexists(metadata_path):
            raise ArtifactError(
                f"'{folder}' is not an exported artifact (needs {spec.MODEL_FILE} and {spec.METADATA_FILE}); "
                "create one with: recbole-llm export --checkpoint CHECKPOINT --output FOLDER"
            )
        for path in (metadata_path, model_path):  # regular files, looked at before anything opens them
            files.check_regular(path)
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
        self.metadata = read_metadata(metadata_path)
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
        self._text_tower: TextTower | None = None  # of an artifact with item text: new items' vectors
        self._adding = threading.Lock()
        self.retrieval = retrieval
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
        model_bytes = files.read_regular(model_path)
        self._model_sha256 = files.file_record(model_bytes)["sha256"]
        try:
            self.session = ort.InferenceSession(bytes(model_bytes), options, providers=list(providers))
        except Exception as error:  # noqa: BLE001 - ONNX Runtime's errors share no public base class
            raise ArtifactError(
                f"ONNX Runtime cannot load '{model_path}' ({first_line(error)}); if the file is truncated or "
                f"corrupt, {REEXPORT}") from None
        del model_bytes
        # the graph vouches for metadata.json and every companion file: each is a regular file of the signed
        # size (looked at before it is opened) whose digest is the signed one, read once, and used as read
        self.signed_files = check_graph(
            [node.name for node in self.session.get_inputs()],
            {node.name: node.shape for node in self.session.get_outputs()},
            self.session.get_modelmeta().custom_metadata_map, self.metadata, model_path, metadata_path)
        tokens = self.metadata["item_tokens"]
        vectors = (files.read_item_vectors(folder, self.metadata, self.signed_files[spec.ITEM_VECTORS_FILE])
                   if self.item_index else None)
        self._catalogue = Catalogue(tokens, {token: index for index, token in enumerate(tokens) if index}, vectors)
        if self.text_tower:  # loaded and checked now, not at the first item added (a service would start, then fail)
            self._text_tower = TextTower(
                folder,
                files.read_companion(folder, spec.TOKENIZER_FILE, self.signed_files[spec.TOKENIZER_FILE]),
                files.read_companion(folder, spec.TEXT_TOWER_FILE, self.signed_files[spec.TEXT_TOWER_FILE]),
                self.text_tower["max_tokens"], self.item_index["dim"], self._providers, self._threads)
        self._ann = AnnIndex(self.item_vectors) if retrieval == "ann" else None  # faiss, with retrieval="ann"
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
        names = spec.output_names(self.top_k, self.item_index is not None)
        try:
            outputs = self.session.run(names, feeds, quiet)
        except Exception as error:  # noqa: BLE001
            raise ArtifactError(
                f"'{model_path}' fails on a history of max_length={self.max_length} items ({first_line(error)}); "
                f"'{metadata_path}' must hold the max_length the model was exported with, or {REEXPORT}") from None
        width = (self.item_index["dim"] if self.item_index else len(self.tokens) if self.top_k is None
                 else self.top_k)
        if outputs[0].shape != (1, width):
            raise ArtifactError(
                f"'{model_path}' returns {names[0]} of shape {list(outputs[0].shape)} for one history, but "
                f"'{metadata_path}' says [1, {width}]; {REEXPORT}")
        if self.top_k is not None and not ((outputs[0] >= 0) & (outputs[0] < len(self.tokens))).all():
            raise ArtifactError(
                f"'{model_path}' returns item ids beyond the {len(self.tokens)} item_tokens of "
                f"'{metadata_path}'; {REEXPORT}")

    def encode(self, histories: Sequence[Sequence[str]]) -> Encoded:
        """Internal ids, right-padded, most recent ``max_length`` items; lengths; unknown-token counts; and
        every known item of each history, however long (what ``exclude_seen`` drops)."""
        if not is_sequence(histories, ndim=2):
            raise InputError(f"histories must be a list of histories (lists of item tokens), not "
                                  f"{type(histories).__name__}")
        if not len(histories):
            raise InputError("histories is empty; pass a non-empty list of histories (lists of item tokens)")
        item_seq = np.zeros((len(histories), self.max_length), dtype=np.int64)
        item_length = np.zeros(len(histories), dtype=np.int64)
        unknown_counts, seen = [], []
        for row, history in enumerate(histories):
            if not is_sequence(history):
                hint = "; pass a list of item tokens" if isinstance(history, (str, bytes)) else ""
                raise InputError(
                    f"history {row} must be a list of item tokens, not {type(history).__name__}{hint}")
            for position, token in enumerate(history):
                if not is_token(token):
                    raise InputError(f"history {row}, position {position}: item tokens must be strings or "
                                          f"integers, not {type(token).__name__}")
            ids = [self.token_to_id.get(str(token)) for token in history]
            unknown = [str(token) for token, index in zip(history, ids) if index is None]
            if unknown and self.unknown_tokens == "error":
                raise InputError(
                    f"history {row} has {len(unknown)} unknown item tokens (first: '{shown(unknown[0])}'); "
                    "drop them or use unknown_tokens='skip'"
                )
            every = [index for index in ids if index is not None]
            known = every[-self.max_length :]
            if not known:
                what = "is empty" if not len(history) else "has no item the model knows"
                raise InputError(f"history {row} {what}; a recommendation needs at least one known item")
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
            raise InputError(f"k must be an integer from 1 to {self.max_k}, not {type(k).__name__}")
        if not 1 <= k <= self.max_k:
            given = f"k={int(k)}" if abs(k) < 10**12 else "a k beyond 10^12"
            raise InputError(f"{given} is out of range; this artifact returns 1 to {self.max_k} items")

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
            raise InputError(f"exclude_seen must be True, False or None, not {type(exclude_seen).__name__}")
        encoded = self.encode(histories)
        rows = len(encoded.item_seq)
        return self.rank(encoded, [k] * rows, [bool(exclude_seen)] * rows, [explain] * rows)

    def check_explain(self, explain: bool) -> None:
        if not isinstance(explain, (bool, np.bool_)):
            raise InputError(f"explain must be True or False, not {type(explain).__name__}")
        if explain and self.top_k is not None:
            raise InputError(
                f"explanations need every item's score, and this artifact returns only its top {self.top_k}: "
                "export it without --top-k to explain recommendations")

    def rank(self, encoded: Encoded, ks: Sequence[int], exclude_seen: Sequence[bool],
             explain: Sequence[bool] | None = None) -> list[Recommendation]:
        """Encoded rows (``encode``, or several concatenated with :meth:`Encoded.join`) to answers in one
        ONNX Runtime call; k, exclude_seen and explain per row, so rows of different requests can share the
        call. ``exclude_seen`` drops every item of the row's history, not only the model's window."""
        answers = self._rank(encoded, ks, exclude_seen)
        if explain is not None and any(explain):
            explaining.add_explanations(encoded, answers, explain, self._catalogue, self._scores, self._user_vectors)
        return answers

    @staticmethod
    def explain_rows(encoded: Encoded, explain: Sequence[bool]) -> int:
        """The model rows explaining costs: each explained history, and it once without each item the model
        reads (items read + 1; a one-item history has nothing to leave out: 1). What the service limits
        (``--max-explained``): the model's time and memory grow with it."""
        return explaining.explain_rows(encoded, explain)

    @staticmethod
    def explain_effects(encoded: Encoded, ks: Sequence[int], explain: Sequence[bool]) -> int:
        """The effects an explained answer reports: k recommended items x the items the model reads, per
        history; the answer's size grows with it."""
        return explaining.explain_effects(encoded, ks, explain)

    def _feeds(self, item_seq: np.ndarray, item_length: np.ndarray,
               exclude_items: np.ndarray | None = None) -> dict[str, np.ndarray]:
        feeds = spec.feeds(item_seq, item_length, exclude_items, self.top_k)
        if self.item_vectors is not None:
            feeds[spec.ITEM_VECTORS] = self.item_vectors
        return feeds

    def _scores(self, item_seq: np.ndarray, item_length: np.ndarray, vectors: np.ndarray | None = None) -> np.ndarray:
        """Every item's score, float32 [rows, n_items], from a graph without top-k (``vectors``: the item
        table of the catalogue the call reads)."""
        if vectors is None:
            vectors = self.item_vectors
        if vectors is None:
            (scores,) = self.session.run(spec.output_names(None), spec.feeds(item_seq, item_length))
            return scores
        return ranking.item_scores(self._user_vectors(item_seq, item_length, vectors), vectors)

    def _user_vectors(self, item_seq: np.ndarray, item_length: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """The graph's user vectors [rows, dim]. The graph only looks rows of ``item_vectors`` up, so it gets
        the rows of the items these histories hold (padding first) and ids into them: its cost does not grow
        with the catalogue."""
        used, positions = np.unique(np.concatenate([[0], item_seq.ravel()]), return_inverse=True)
        feeds = {**spec.feeds(positions[1:].reshape(item_seq.shape), item_length),
                 spec.ITEM_VECTORS: np.ascontiguousarray(vectors[used])}
        (user_vectors,) = self.session.run(spec.output_names(None, True), feeds)
        return user_vectors

    def _rank(self, encoded: Encoded, ks: Sequence[int], exclude_seen: Sequence[bool]) -> list[Recommendation]:
        catalogue = self._catalogue  # one catalogue for the whole call, even if items are added meanwhile
        k_max = max(ks)
        exclude_items = ranking.exclusions(encoded.seen, exclude_seen)
        if self.top_k is not None:
            feeds = spec.feeds(encoded.item_seq, encoded.item_length, exclude_items, self.top_k)
            top_items, top_scores = self.session.run(spec.output_names(self.top_k), feeds)
            top_items, top_scores = top_items[:, :k_max], top_scores[:, :k_max]
        elif self._ann is not None:
            user_vectors = self._user_vectors(encoded.item_seq, encoded.item_length, catalogue.vectors)
            top_items, top_scores = self._ann.top_k(user_vectors, k_max, exclude_items, catalogue.vectors)
        else:  # the same exclusions and ordering as a top-k graph, in numpy
            scores = self._scores(encoded.item_seq, encoded.item_length, catalogue.vectors)
            top_items, top_scores = ranking.top_k(scores, k_max, exclude_items)
        if not ((top_items >= 0) & (top_items < len(catalogue.tokens))).all():  # never past the token list
            raise ArtifactError(
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

    # --- a living catalogue: artifacts exported with --item-index (recbole_llm.serving.catalogue) -------------

    def add_items(self, items: Mapping[str, str | Mapping[str, str]]) -> list[int]:
        """Add items to this loaded artifact from their text alone: ``{token: text}``, where text is a string
        (the item's text fields joined by ", ", as the model read them at training) or ``{field: value}`` of
        the artifact's ``item_text_fields``. Each new item's vector comes from the artifact's text tower; new
        items are recommended and may appear in histories at once. Returns their internal ids. Raises
        RecboleLLMError (nothing added) for an artifact without an item index or text tower, an empty
        mapping, a token already in the artifact or given twice, or an item without text."""
        return living.add_items(self, items)

    def vectors_from_text(self, texts: Sequence[str]) -> np.ndarray:
        """Item vectors float32 [len(texts), dim] from item texts, through the artifact's text tower, in chunks
        of ``TEXT_CHUNK`` texts (memory stays flat however many items are added)."""
        return self._text_tower.vectors(texts)

    def save(self, output: str | Path, replace: bool = False) -> Path:
        """Write this artifact, items added included, to the folder ``output``: into a new folder beside it,
        renamed into place when whole (a reader sees the old artifact or the new one). ``output`` must not
        exist unless ``replace`` (then it must be an artifact); replacing the folder this artifact was loaded
        from is refused if another update wrote it meanwhile (its item table changed since the load: load it
        again). Writers of one folder take turns (a lock file beside it). Returns the folder."""
        return living.save(self, output, replace)
