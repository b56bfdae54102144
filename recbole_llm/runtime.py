"""Serving an exported artifact with ONNX Runtime: raw item tokens in, top-K raw item tokens out.

Needs only onnxruntime and numpy (no RecBole, no torch):

    from recbole_llm.runtime import Recommender
    recommender = Recommender("artifacts/bertlora")
    [answer] = recommender.recommend([["242", "302", "377"]], k=10)
    answer.items, answer.scores, answer.unknown_tokens

Histories longer than the model's maximum length keep their most recent items. Unknown tokens follow
``unknown_tokens``: ``"skip"`` (default: dropped and counted in the answer) or ``"error"``. A history with
no known item left is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from recbole_llm.errors import RecboleLLMError

UNKNOWN_TOKEN_POLICIES = ("skip", "error")


@dataclass
class Recommendation:
    items: list[str]
    scores: list[float]
    unknown_tokens: int  # tokens of this history that the model does not know (skipped)


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
        if not (folder / "model.onnx").is_file() or not (folder / "metadata.json").is_file():
            raise RecboleLLMError(
                f"'{folder}' is not an exported artifact (needs model.onnx and metadata.json); "
                "create one with: recbole-llm export --checkpoint CHECKPOINT --output FOLDER"
            )
        if unknown_tokens not in UNKNOWN_TOKEN_POLICIES:
            raise RecboleLLMError(f"unknown_tokens '{unknown_tokens}' is not a policy; use 'skip' or 'error'")
        self.metadata = json.loads((folder / "metadata.json").read_text())
        self.unknown_tokens = unknown_tokens
        self.max_length = int(self.metadata["max_length"])
        self.top_k = self.metadata.get("top_k")
        self.tokens = self.metadata["item_tokens"]
        self.token_to_id = {token: index for index, token in enumerate(self.tokens) if index}
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=list(providers))

    def encode(self, histories: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Internal ids, right-padded, most recent ``max_length`` items; lengths; unknown-token counts."""
        if isinstance(histories, (str, bytes)) or not histories:
            raise RecboleLLMError("histories must be a non-empty list of histories (lists of item tokens)")
        item_seq = np.zeros((len(histories), self.max_length), dtype=np.int64)
        item_length = np.zeros(len(histories), dtype=np.int64)
        unknown_counts = []
        for row, history in enumerate(histories):
            if isinstance(history, (str, bytes)):
                raise RecboleLLMError(f"history {row} is a string; pass a list of item tokens")
            ids = [self.token_to_id.get(str(token)) for token in history]
            unknown = [str(token) for token, index in zip(history, ids) if index is None]
            if unknown and self.unknown_tokens == "error":
                raise RecboleLLMError(
                    f"history {row} has {len(unknown)} unknown item tokens (first: '{unknown[0]}'); "
                    "drop them or use unknown_tokens='skip'"
                )
            known = [index for index in ids if index is not None][-self.max_length :]
            if not known:
                what = "is empty" if not history else "has no item the model knows"
                raise RecboleLLMError(f"history {row} {what}; a recommendation needs at least one known item")
            item_seq[row, : len(known)] = known
            item_length[row] = len(known)
            unknown_counts.append(len(unknown))
        return item_seq, item_length, unknown_counts

    @property
    def max_k(self) -> int:
        """The most items one answer can hold."""
        return self.top_k or len(self.tokens) - 1

    def check_k(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.max_k:
            raise RecboleLLMError(f"k={k!r} is out of range; this artifact returns 1 to {self.max_k} items")

    def recommend(
        self, histories: Sequence[Sequence[str]], k: int = 10, exclude_seen: bool = True
    ) -> list[Recommendation]:
        self.check_k(k)
        item_seq, item_length, unknown_counts = self.encode(histories)
        rows = len(item_seq)
        return self.rank(item_seq, item_length, [k] * rows, [bool(exclude_seen)] * rows, unknown_counts)

    def rank(
        self,
        item_seq: np.ndarray,
        item_length: np.ndarray,
        ks: Sequence[int],
        exclude_seen: Sequence[bool],
        unknown_counts: Sequence[int],
    ) -> list[Recommendation]:
        """Encoded rows (``encode``) to answers in one ONNX Runtime call; k and exclude_seen per row, so
        rows of different requests can share the call."""
        exclude = np.asarray(exclude_seen, dtype=bool)
        k_max = max(ks)
        feeds = {"item_seq": item_seq, "item_length": item_length}
        if self.top_k is not None:
            feeds["exclude_seen"] = exclude
            top_items, top_scores = self.session.run(["top_items", "top_scores"], feeds)
            top_items, top_scores = top_items[:, :k_max], top_scores[:, :k_max]
        else:
            (scores,) = self.session.run(["scores"], feeds)
            scores = scores.astype(np.float32, copy=True)
            if exclude.any():
                seen = np.zeros(scores.shape, dtype=bool)
                np.put_along_axis(seen, item_seq, True, axis=1)
                scores[seen & exclude[:, None]] = -np.inf
            scores[:, 0] = -np.inf  # padding is not an item
            top_items = np.argsort(-scores, axis=1, kind="stable")[:, :k_max]
            top_scores = np.take_along_axis(scores, top_items, axis=1)
        answers = []
        for items, scores_row, k, unknown in zip(top_items, top_scores, ks, unknown_counts):
            items, scores_row = items[:k], scores_row[:k]
            finite = np.isfinite(scores_row)  # fewer than k recommendable items left after exclusions
            answers.append(Recommendation(
                items=[self.tokens[i] for i in items[finite]],
                scores=[float(s) for s in scores_row[finite]],
                unknown_tokens=int(unknown),
            ))
        return answers
