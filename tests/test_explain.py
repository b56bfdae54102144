"""Explanations on a trained, exported model: a history item planted to drive a recommendation is named first.

Synthetic RecBole atomic files: every user's history is random items, except that item P is always followed
by item Q. BERTRec (tiny random encoder) learns it; exported, the artifact recommends Q after a history
holding P, and the leave-one-out explanation of Q puts P first.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from conftest import train_checkpoint
from recbole_llm.export import ExportOptions, export_checkpoint
from recbole_llm.serving.runtime import Recommender

PLANTED, FOLLOWER = "900", "901"


def write_planted(folder: Path, users: int = 200, length: int = 30, items: int = 60) -> Path:
    rng = random.Random(7)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in range(1, users + 1):
        history = [str(rng.randint(1, items)) for _ in range(length)]
        for _ in range(2):  # P, then Q, twice somewhere in each history
            at = rng.randrange(0, len(history) - 1)
            history[at : at + 2] = [PLANTED, FOLLOWER]
        lines += [f"{user}\t{item}\t{time}" for time, item in enumerate(history)]
    target = folder / "ml-plant"
    target.mkdir(parents=True, exist_ok=True)
    (target / "ml-plant.inter").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def planted_artifact(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("plant")
    checkpoint = train_checkpoint(folder, "BERTRec", "ml-plant", {
        "data_path": str(write_planted(folder / "data")), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "pretrained_model_name_or_path": None, "n_layers": 1, "n_heads": 2, "hidden_size": 32, "inner_size": 64,
        "MAX_ITEM_LIST_LENGTH": 10, "epochs": 8, "learning_rate": 0.005, "train_batch_size": 256})
    return str(export_checkpoint(checkpoint, folder / "artifact", ExportOptions()).path)


@pytest.mark.slow
def test_a_planted_history_item_is_named_first(planted_artifact):
    recommender = Recommender(planted_artifact)
    rng = random.Random(11)
    explained = 0
    for _ in range(5):
        history = [str(rng.randint(1, 60)) for _ in range(6)] + [PLANTED]
        (answer,) = recommender.recommend([history], k=5, explain=True)
        assert answer.items[0] == FOLLOWER, answer.items  # the model learned P -> Q
        contributions = answer.explanations[0]
        assert contributions[0].item == PLANTED, [(c.item, round(c.effect, 3)) for c in contributions]
        assert contributions[0].effect > 0 and len(contributions) == len(history)
        explained += 1
    assert explained == 5


def expected_repeat_rate(folder: Path, window: int) -> float:
    """From the atomic file: the share of training next items (RecBole's leave-one-out keeps each user's last
    two for validation and test) already among the `window` items before them."""
    events: dict[str, list[tuple[float, str]]] = {}
    for line in (folder / "ml-plant" / "ml-plant.inter").read_text().splitlines()[1:]:
        user, item, time = line.split("\t")
        events.setdefault(user, []).append((float(time), item))
    repeats = total = 0
    for history in events.values():
        items = [item for _, item in sorted(history)]
        for t in range(1, len(items) - 2):
            total += 1
            repeats += items[t] in items[max(0, t - window) : t]
    return repeats / total


@pytest.mark.slow
def test_export_records_the_training_datas_repeat_rate_and_serving_follows_it(planted_artifact, tmp_path):
    """The planted data draws items from 60 with replacement, so users come back to items: export records
    the repeat rate RecBole's evaluator sees, the served exclude_seen defaults to false, and the service says
    so in one line at start."""
    import json

    from helpers import LoggedService

    from recbole_llm.artifact import REPEAT_RATE_THRESHOLD

    metadata = json.loads((Path(planted_artifact) / "metadata.json").read_text())
    write_planted(tmp_path / "data")
    want = expected_repeat_rate(tmp_path / "data", 10)
    assert abs(metadata["repeat_rate"] - want) < 1e-6 and want > REPEAT_RATE_THRESHOLD, (metadata["repeat_rate"], want)
    assert metadata["exclude_seen"] is False
    recommender = Recommender(planted_artifact)
    history = [str(i) for i in range(1, 11)]
    assert recommender.recommend([history], k=20) == recommender.recommend([history], k=20, exclude_seen=False)
    service = LoggedService(planted_artifact)
    try:
        status, body = service.recommend({"histories": [history], "k": 20})
        assert status == 200 and body["recommendations"][0]["items"] == recommender.recommend([history], k=20)[0].items
        assert service.get("/metadata")[1]["service"]["exclude_seen_default"] is False
        assert service.wait_for_log("of next items in the training data were already in the user's history: "
                                    "exclude_seen defaults to false"), service.log
    finally:
        service.close()
