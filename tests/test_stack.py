"""RecBole 1.2.1 on today's stack: numpy 1 or 2, with or without ray (CI runs both stacks)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from recbole_llm import RecboleLLMError


def ray_imports() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import ray.tune"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_without_ray_only_ray_based_search_says_it_needs_ray():
    from recbole.quick_start import quick_start

    if ray_imports():
        assert quick_start.tune.__name__ == "ray.tune"
        return
    assert quick_start.tune.report(ndcg=0.1) is None  # as ray's outside a session: objective_function works
    with pytest.raises(RecboleLLMError, match="hyper-parameter search needs ray"):
        quick_start.tune.run(lambda config: None)
    # the stand-in lived only while RecBole's quick_start imported: libraries probing for ray see none
    assert "ray" not in sys.modules
    found = importlib.util.find_spec("ray")
    assert found is None or found.origin  # absent, or a real (broken) installation on disk


def test_numpy_aliases_recbole_uses_exist_without_overriding_numpy():
    assert np.float is np.float64 and np.int is np.int_ and np.bool8 is np.bool_
    if np.__version__ >= "2":
        assert np.bool is np.bool_  # numpy 2's own alias, not replaced


@pytest.mark.slow
def test_metrics_are_plain_floats(tiny_bert):
    from recbole.quick_start import run_recbole

    result = run_recbole(model="BERTRec", dataset="ml-tiny", config_dict={
        **tiny_bert, "epochs": 1, "save_model": False})
    assert all(type(value) is float for value in result["test_result"].values()), result["test_result"]
    # what RecBole logs is a Python literal again on numpy 2 (it printed np.float64(...) before)
    assert "np.float64" not in repr(result["test_result"])


def test_missing_values_are_filled(data_root, tmp_path):
    """RecBole fills a missing float with the column mean and a missing token with 0 ([PAD]): true on the
    pandas versions the project allows (pandas 3 turns these fills into no-ops, so it is pinned away)."""
    import shutil

    from recbole.config import Config
    from recbole.data import create_dataset

    folder = tmp_path / "ml-gaps"
    folder.mkdir()
    shutil.copy(data_root / "ml-tiny" / "ml-tiny.inter", folder / "ml-gaps.inter")
    users = sorted({line.split("\t")[0] for line in (folder / "ml-gaps.inter").read_text().splitlines()[1:]}, key=int)
    rows = ["user_id:token\tage:float\tgender:token", f"{users[0]}\t\tM", f"{users[1]}\t30\tF", f"{users[2]}\t50\tM"]
    (folder / "ml-gaps.user").write_text("\n".join(rows) + "\n")
    config = Config(model="BERTRec", dataset="ml-gaps", config_dict={
        "data_path": str(tmp_path), "pretrained_model_name_or_path": None, "hidden_size": 32, "inner_size": 64,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "user": ["user_id", "age", "gender"]}})
    dataset = create_dataset(config)
    feat = dataset.user_feat
    assert not feat["age"].isna().any() and not feat["gender"].isna().any()
    row_of = {token: dataset.field2id_token["user_id"].tolist().index(token) for token in users[:3]}
    age = feat["age"].to_numpy()
    assert age[row_of[users[1]]] == 30 and age[row_of[users[2]]] == 50
    assert age[row_of[users[0]]] == pytest.approx(40.0)  # the mean of the ages given
    # row 0 is the padding user RecBole adds with every field missing: mean age, [PAD] gender
    assert age[0] == pytest.approx(40.0) and feat["gender"].to_numpy()[0] == 0
