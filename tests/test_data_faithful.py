"""The data a model sees is the data on disk: histories in true time order whatever the timestamps'
magnitude, sampled evaluation that gives one checkpoint one set of figures, RecBole's ordering option and
the shortest history window all through RecBole's own code paths."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from recbole.config import Config
from recbole.data import create_dataset, data_preparation

from conftest import best_checkpoint, train_checkpoint
from helpers import assert_one_line_error, cli

TINY = {"pretrained_model_name_or_path": None, "n_layers": 1, "hidden_size": 32, "inner_size": 64}


def true_histories(inter: Path) -> dict[str, list[str]]:
    """Each user's item tokens by timestamp as exact integers, ties kept in file order."""
    rows = [line.split("\t") for line in inter.read_text().splitlines()[1:]]
    ordered = sorted(enumerate(rows), key=lambda pair: (int(pair[1][-1]), pair[0]))
    histories: dict[str, list[str]] = {}
    for _, (user, item, *_rest) in ordered:
        histories.setdefault(user, []).append(item)
    return histories


def built_histories(dataset, split) -> dict[str, list[str]]:
    """user token -> the test row's history followed by its target, as RecBole built them."""
    inter = split.inter_feat
    uid, iid = dataset.uid_field, dataset.iid_field
    seen = {}
    for user, items, length, target in zip(inter[uid].tolist(), inter[f"{iid}_list"].tolist(),
                                           inter["item_length"].tolist(), inter[iid].tolist()):
        tokens = dataset.id2token(iid, items[:length] + [target]).tolist()
        seen[str(dataset.id2token(uid, user))] = [str(token) for token in tokens]
    return seen


def write_second_resolution_log(folder: Path, users: int = 40, events: int = 12) -> Path:
    """Unix-second events 5 s apart (far under float32's 128 s at today's epoch), rows shuffled."""
    rng = random.Random(7)
    rows = []
    start = 1_700_000_000
    for user in range(1, users + 1):
        for step in range(events):
            rows.append(f"{user}\t{rng.randint(1, 60)}\t{start + user * 1000 + step * 5}")
    rng.shuffle(rows)
    target = folder / "sec-log"
    target.mkdir(parents=True)
    inter = target / "sec-log.inter"
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows) + "\n")
    return inter


@pytest.mark.parametrize("model", ["BERTRec", "SASRec"])
def test_second_resolution_histories_are_in_true_time_order(model, tmp_path):
    inter = write_second_resolution_log(tmp_path / "data")
    config = Config(model=model, dataset="sec-log", config_dict={
        "data_path": str(tmp_path / "data"), **TINY, "MAX_ITEM_LIST_LENGTH": 20, "show_progress": False})
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    assert str(test._dataset.inter_feat["timestamp"].dtype) == "torch.float64"  # not float32's 128 s steps
    truth = true_histories(inter)
    built = built_histories(dataset, test._dataset)
    assert len(built) == 40
    wrong = [user for user, items in built.items() if items != truth[user]]
    assert wrong == [], f"{len(wrong)} of 40 users' test histories out of time order"
    # the training rows too: every prefix row ends where the user's true history does
    train_rows = train._dataset.inter_feat
    for user, items, length, target in zip(train_rows["user_id"].tolist(), train_rows["item_id_list"].tolist(),
                                           train_rows["item_length"].tolist(), train_rows["item_id"].tolist()):
        tokens = [str(t) for t in dataset.id2token("item_id", items[:length] + [target]).tolist()]
        assert tokens == truth[str(dataset.id2token("user_id", user))][:length + 1]


@pytest.mark.slow
def test_bundled_ml100k_test_targets_and_windows_follow_true_time_order():
    """ml-100k's timestamps (8.8e8 s) were rounded to 64 s: 4 test targets and 13 windows moved."""
    import recbole

    inter = Path(recbole.__file__).parent / "dataset_example" / "ml-100k" / "ml-100k.inter"
    config = Config(model="SASRec", dataset="ml-100k", config_dict={
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "MAX_ITEM_LIST_LENGTH": 50,
        "hidden_size": 16, "inner_size": 32, "n_layers": 1, "show_progress": False})
    dataset = create_dataset(config)
    _, _, test = data_preparation(config, dataset)
    truth = true_histories(inter)
    built = built_histories(dataset, test._dataset)
    assert len(built) == 943
    assert [user for user, items in built.items() if items != truth[user][-len(items):]] == []


# ---------------------------------------------------------------------------------------------------------
# sampled evaluation


SAMPLED = {"eval_args": {"split": {"LS": "valid_and_test"}, "mode": "uni100"}, "metrics": ["Recall", "NDCG"],
           "topk": [10], "valid_metric": "NDCG@10", "eval_batch_size": 64}


@pytest.fixture(scope="module")
def sampled_checkpoint(data_root, tmp_path_factory) -> tuple[Path, dict]:
    """BERTRec trained with sampled (uni100) validation and test; the run's own test figures."""
    from recbole.quick_start import run_recbole

    folder = tmp_path_factory.mktemp("sampled")
    import os

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = run_recbole(model="BERTRec", dataset="ml-tiny", config_dict={
            "data_path": str(data_root), "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, **TINY,
            **SAMPLED, "MAX_ITEM_LIST_LENGTH": 10, "epochs": 2, "show_progress": False, "seed": 2020,
            "checkpoint_dir": str(folder / "saved")})
    finally:
        os.chdir(cwd)
    return best_checkpoint(folder / "saved"), result["test_result"]


@pytest.mark.slow
def test_sampled_evaluation_gives_one_checkpoint_one_set_of_figures(sampled_checkpoint):
    """RecBole redrew uni100 negatives at every evaluation (RUCAIBox/RecBole#2077): 0.0403 in the run,
    0.0410 from evaluate, 0.0410 / 0.0396 / 0.0398 across three evaluations."""
    import numpy as np
    from recbole.quick_start import load_data_and_model
    from recbole.utils import get_trainer

    checkpoint, in_the_run = sampled_checkpoint
    config, model, _, _, _, test_data = load_data_and_model(str(checkpoint))
    assert config["eval_args"]["mode"] == {"valid": "uni100", "test": "uni100"}
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    repeated = []
    for _ in range(3):
        np.random.rand(17)  # whatever else moved numpy's global generator in between
        repeated.append(dict(trainer.evaluate(test_data, load_best_model=False, show_progress=False)))
    assert repeated[0] == repeated[1] == repeated[2] == dict(in_the_run)


    evaluated = cli("evaluate", f"--checkpoint={checkpoint}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    found = re.findall(r"\('([\w@]+)', ([\d.e-]+)\)", next(
        line for line in (evaluated.stdout + evaluated.stderr).splitlines() if "test result" in line))
    from_cli = {name: float(value) for name, value in found}
    assert from_cli == pytest.approx(dict(in_the_run), abs=1e-4)  # the log prints 4 decimals


def test_an_eval_args_without_order_is_time_order_for_sequential_models(data_root):
    """RecBole fills a user's eval_args that leaves order out with RO, which SequentialDataset refuses in a
    27-line traceback: ``eval_args: {mode: uni100}`` did not run."""
    config = Config(model="BERTRec", dataset="ml-tiny", config_dict={
        "data_path": str(data_root), **TINY, "eval_args": {"mode": "uni100"}})
    assert config["eval_args"]["order"] == "TO"
    data_preparation(config, create_dataset(config))  # builds


@pytest.mark.slow
def test_order_ro_is_one_line_for_sequential_models(data_root):
    result = cli("run", "--model=BERTRec", "--dataset=ml-tiny", f"--data_path={data_root}",
                 "--pretrained_model_name_or_path=None", "--n_layers=1", "--hidden_size=32", "--inner_size=64",
                 "--eval_args={'order': 'RO', 'split': {'LS': 'valid_and_test'}, 'mode': 'full'}")
    assert_one_line_error(result, "eval_args order 'RO' is not supported by sequential models", "order: TO")


@pytest.mark.slow
def test_a_missing_time_column_suggests_what_works(data_root, tmp_path):
    """The one-line error used to suggest order: RO, which then failed in a traceback."""
    folder = tmp_path / "no-time"
    folder.mkdir()
    (folder / "no-time.inter").write_text("user_id:token\titem_id:token\n1\t10\n1\t11\n2\t10\n2\t12\n")
    result = cli("run", "--model=BERTRec", "--dataset=no-time", f"--data_path={tmp_path}",
                 "--pretrained_model_name_or_path=None", "--n_layers=1", "--hidden_size=32", "--inner_size=64")
    assert_one_line_error(result, "has no 'timestamp' field", "timestamp:float")
    assert "RO" not in result.stderr


# ---------------------------------------------------------------------------------------------------------
# the shortest window


@pytest.mark.slow
@pytest.mark.parametrize("model, options", [
    ("BERTRec", {}), ("BERTRec", {"top_k": 5}), ("BERTRec", {"item_index": True}), ("SASRec", {}),
])
def test_a_model_of_history_length_one_exports_and_serves(model, options, data_root, tmp_path):
    """MAX_ITEM_LIST_LENGTH=1 trained, then export failed with 'index 1 is out of bounds': the trace's
    example history was 2 items long."""
    from recbole_llm.export import ExportOptions, export_checkpoint
    from recbole_llm.serving.runtime import Recommender

    extra = TINY if model == "BERTRec" else {"hidden_size": 32, "inner_size": 64, "n_layers": 1}
    checkpoint = train_checkpoint(tmp_path / "run", model, "ml-tiny", {
        "data_path": str(data_root), "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, **extra,
        "MAX_ITEM_LIST_LENGTH": 1, "epochs": 1})
    result = export_checkpoint(checkpoint, tmp_path / "art", ExportOptions(**options))
    assert result.metadata["max_length"] == 1
    assert all(report["passed"] for report in result.metadata["validation"])
    recommender = Recommender(result.path)
    tokens = [token for token in recommender.tokens[1:6]]
    answers = recommender.recommend([tokens[:3], tokens[3:4], tokens[:2]], k=3)
    assert [len(answer.items) for answer in answers] == [3, 3, 3]
    # only the last item counts at length 1
    assert answers[0].items == recommender.recommend([tokens[2:3]], k=3)[0].items
