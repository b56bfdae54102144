"""exclude_seen drops every item of the history, also the ones older than the model's window.

Histories here are three times the window (max_length 8, 24 items) and made of the most popular items, so
a model ranks many of them high: without exclusion they fill the top 10, and with it none may appear —
through the runtime (top-k and full-score artifacts), the graph's own exclude_items input and the service.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from conftest import train_checkpoint
from recbole_llm.export import ExportOptions, export_checkpoint
from recbole_llm.artifact import exclusions
from recbole_llm.serving.runtime import Recommender

WINDOW = 8


@pytest.fixture(scope="module")
def artifacts(data_root, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("seen")
    checkpoint = train_checkpoint(folder, "BERTRec", "ml-slice", {
        "data_path": str(data_root), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "pretrained_model_name_or_path": None, "n_layers": 1, "n_heads": 2, "hidden_size": 32,
        "inner_size": 64, "MAX_ITEM_LIST_LENGTH": WINDOW, "epochs": 2, "learning_rate": 0.003})
    return {"top_k": str(export_checkpoint(checkpoint, folder / "top", ExportOptions(top_k=10)).path),
            "scores": str(export_checkpoint(checkpoint, folder / "scores", ExportOptions()).path)}


@pytest.fixture(scope="module")
def histories(data_root) -> list[list[str]]:
    counts = collections.Counter(line.split("\t")[1] for line in
                                 (data_root / "ml-slice" / "ml-slice.inter").read_text().splitlines()[1:])
    popular = [item for item, _ in counts.most_common(3 * WINDOW + 5)]
    return [popular[: 3 * WINDOW], popular[5 : 5 + 3 * WINDOW], list(reversed(popular[: 3 * WINDOW]))]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["top_k", "scores"])
def test_the_runtime_excludes_the_whole_history(kind, artifacts, histories):
    recommender = Recommender(artifacts[kind])
    kept = recommender.recommend(histories, k=10, exclude_seen=False)
    assert any(set(answer.items) & set(history[:-WINDOW]) for answer, history in zip(kept, histories)), \
        "the test needs histories whose older items the model would recommend"
    for answer, history in zip(recommender.recommend(histories, k=10, exclude_seen=True), histories):
        assert len(answer.items) == 10 and not set(answer.items) & set(history), (answer.items, history)


@pytest.mark.slow
def test_the_graph_takes_the_history_to_exclude(artifacts, histories):
    import onnxruntime as ort

    recommender = Recommender(artifacts["top_k"])
    encoded = recommender.encode(histories)
    session = ort.InferenceSession(artifacts["top_k"] + "/model.onnx", providers=["CPUExecutionProvider"])
    top_items, _ = session.run(None, {"item_seq": encoded.item_seq, "item_length": encoded.item_length,
                                      "exclude_items": exclusions(encoded.seen, [True] * len(histories))})
    for row, history in enumerate(histories):
        ids = {recommender.token_to_id[token] for token in history}
        assert len(ids) == 3 * WINDOW and not set(top_items[row].tolist()) & ids


def test_the_service_excludes_the_whole_history(artifacts, histories):
    from helpers import Service

    service = Service(artifacts["top_k"])
    try:
        status, body = service.recommend({"histories": histories, "k": 10})
        assert status == 200, body
        for answer, history in zip(body["recommendations"], histories):
            assert len(answer["items"]) == 10 and not set(answer["items"]) & set(history)
    finally:
        service.close()


def test_artifacts_of_the_window_only_format_are_refused(artifacts, tmp_path):
    import json
    import shutil

    from recbole_llm import RecboleLLMError

    old = tmp_path / "old"
    shutil.copytree(artifacts["top_k"], old)
    metadata = json.loads((old / "metadata.json").read_text())
    metadata["format_version"] = 1
    (old / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(RecboleLLMError, match="format 1 artifacts drop only the items inside the model's window"):
        Recommender(old)
    assert np.all(exclusions([np.array([3, 4]), np.array([5])], [True, False]) == [[3, 4], [0, 0]])


def test_runtime_and_service_bounds_found_by_the_hostile_review(artifacts, tmp_path):
    import socket
    import subprocess
    import sys

    from recbole_llm import RecboleLLMError

    with pytest.raises(RecboleLLMError, match="must be a number of threads from 1 to"):
        Recommender(artifacts["top_k"], intra_op_threads=100_000)
    recommender = Recommender(artifacts["top_k"])
    with pytest.raises(RecboleLLMError, match="item tokens must be strings or integers"):
        recommender.recommend([[10**5000]], k=3)  # str() of it raises ValueError in Python
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "recbole_llm", "serve", artifacts["top_k"], "--port", str(port)],
                                capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot listen on 127.0.0.1" in result.stderr and "Address already in use" in result.stderr
