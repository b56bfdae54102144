"""Explanations: how much each history item the model read pushed each recommended item up.

An item's effect is the recommended item's score minus its score with that item left out of the history
(leave-one-out), so explaining needs every item's score: an artifact exported without ``--top-k``. Every
history and its leave-one-out variants are scored in bounded chunks, so an explained request's memory does
not grow with its size; :func:`explain_rows` and :func:`explain_effects` give what a request will cost
before any of it is spent (what the service limits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from recbole_llm.serving.records import Catalogue, Contribution, Encoded, Recommendation

# explanations are scored in chunks: histories per model call, and scores (histories x items) per call of a
# graph that scores every item, so an explained request's memory does not grow with its size
EXPLAIN_CHUNK_ROWS = 256
EXPLAIN_CHUNK_SCORES = 1 << 22


def explain_rows(encoded: Encoded, explain: Sequence[bool]) -> int:
    """The model rows explaining costs: each explained history, and it once without each item the model
    reads (items read + 1; a one-item history has nothing to leave out: 1). What the service limits
    (``--max-explained``): the model's time and memory grow with it."""
    return sum(int(length) + 1 if length > 1 else 1 for length, wanted in zip(encoded.item_length, explain)
               if wanted)


def explain_effects(encoded: Encoded, ks: Sequence[int], explain: Sequence[bool]) -> int:
    """The effects an explained answer reports: k recommended items x the items the model reads, per
    history; the answer's size grows with it."""
    return sum(int(length) * int(k) for length, k, wanted in zip(encoded.item_length, ks, explain) if wanted)


def add_explanations(encoded: Encoded, answers: list[Recommendation], explain: Sequence[bool],
                     catalogue: Catalogue, scores_of: Callable[..., np.ndarray],
                     user_vectors_of: Callable[..., np.ndarray]) -> None:
    """Leave-one-out effects: every history, and it with each of its window's items removed, scored in
    chunks of at most EXPLAIN_CHUNK_ROWS histories (and EXPLAIN_CHUNK_SCORES scores); of each chunk only
    the recommended items' scores are kept, so memory stays flat however many rows a request adds.

    Sets each explained answer's ``explanations``. ``catalogue``: the one the call reads (ids of recommended
    items stay valid: items are only ever appended); ``scores_of`` and ``user_vectors_of``: the runtime's
    graph calls (every item's score; user vectors), as :meth:`Recommender._scores` and
    :meth:`Recommender._user_vectors` take them."""
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
            scores = scores_of(item_seq, item_length, None)
            for index, key in enumerate(chunk):
                picked[key] = scores[index, targets[key[0]]]
        else:  # only the recommended items' rows of the table: no item-count factor
            users = user_vectors_of(item_seq, item_length, catalogue.vectors)
            for index, key in enumerate(chunk):
                picked[key] = catalogue.vectors[targets[key[0]]] @ users[index]
        del item_seq
    for row in rows:
        answer = answers[row]
        length = int(encoded.item_length[row])
        window = encoded.item_seq[row, :length]
        if length < 2:  # nothing is left to score without the one item
            answer.explanations = [[Contribution(catalogue.tokens[int(window[0])], None)] for _ in answer.items]
            continue
        full = picked[(row, -1)]
        effects = full[None, :] - np.stack([picked[(row, position)] for position in range(length)])  # [L, k]
        explanations = []
        for column in range(len(answer.items)):
            order = np.argsort(-effects[:, column], kind="stable")  # largest first, earlier position on ties
            explanations.append([Contribution(catalogue.tokens[int(window[position])],
                                           float(effects[position, column])) for position in order])
        answer.explanations = explanations
