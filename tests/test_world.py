"""A checkpoint carries the world it was trained in: its id maps and data fingerprint travel with it, data
that changed under it is refused (or noted), and it evaluates and exports from another folder."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil

import numpy as np
import pytest
from recbole.quick_start import load_data_and_model, run_recbole

from conftest import best_checkpoint
from recbole_llm import RecboleLLMError, load_checkpoint
from recbole_llm.export import ExportOptions, export_checkpoint
from helpers import assert_one_line_error, cli

TINY = {"pretrained_model_name_or_path": None, "n_layers": 1, "n_heads": 2, "hidden_size": 32, "inner_size": 64,
        "MAX_ITEM_LIST_LENGTH": 10, "epochs": 1, "show_progress": False,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}}


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory) -> dict:
    """BERTRec trained on a private copy of ml-tiny, with config values a script naturally passes."""
    folder = tmp_path_factory.mktemp("world")
    shutil.copytree(data_root / "ml-tiny", folder / "data" / "ml-tiny")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = run_recbole(model="BERTRec", dataset="ml-tiny", config_dict={
            **TINY, "data_path": folder / "data",  # a pathlib.Path, numpy numbers, a tuple
            "checkpoint_dir": folder / "saved", "learning_rate": np.float32(0.003), "train_batch_size": np.int64(256),
            "topk": (10,)})
    finally:
        os.chdir(cwd)
    return {"checkpoint": best_checkpoint(folder / "saved"), "data": folder / "data", "result": result}


def inter_file(trained) -> pathlib.Path:
    return trained["data"] / "ml-tiny" / "ml-tiny.inter"


@pytest.fixture
def restore_data(trained):
    original = inter_file(trained).read_bytes()
    yield
    inter_file(trained).write_bytes(original)


@pytest.mark.slow
def test_ordinary_python_values_train_and_leave_a_loadable_checkpoint(trained):
    assert trained["result"]["test_result"]["ndcg@10"] >= 0
    config = load_checkpoint(trained["checkpoint"])["config"]
    assert config["data_path"].endswith("ml-tiny") and isinstance(config["learning_rate"], float)
    assert config["topk"] == [10]


@pytest.mark.slow
def test_the_checkpoint_holds_its_id_maps_and_data_fingerprint(trained):
    config = load_checkpoint(trained["checkpoint"])["config"]
    world = config.recbole_llm_world
    _, model, dataset, _, _, _ = load_data_and_model(str(trained["checkpoint"]))
    assert world["token_maps"]["item_id"] == [str(t) for t in dataset.field2id_token["item_id"]]
    assert len(world["token_maps"]["item_id"]) == model.n_items
    assert set(world["files"]) == {"inter", "item"} and all(len(h) == 64 for h in world["files"].values())


@pytest.mark.slow
def test_regenerated_data_whose_ids_moved_is_refused_by_evaluate_and_export(trained, restore_data, tmp_path):
    header, *rows = inter_file(trained).read_text().splitlines()
    inter_file(trained).write_text("\n".join([header, *reversed(rows)]) + "\n")  # same rows, other id order
    with pytest.raises(RecboleLLMError, match=r"is not what this checkpoint was trained on \(id \d+ was '\d+' at "
                                              r"training, is '\d+' now\)"):
        load_data_and_model(str(trained["checkpoint"]))
    assert_one_line_error(cli("evaluate", f"--checkpoint={trained['checkpoint']}"), "would point at other items")
    assert_one_line_error(cli("export", "--checkpoint", str(trained["checkpoint"]), "--output", str(tmp_path / "a")),
                          "would point at other items")
    assert not (tmp_path / "a").exists()


def test_items_appended_after_training_are_refused_in_one_line_not_a_shape_traceback(trained, restore_data):
    with open(inter_file(trained), "a") as f:
        f.write("1\t99999\t5\t999999999\n")
    with pytest.raises(RecboleLLMError, match=r"item_id tokens at training, \d+ now"):
        load_data_and_model(str(trained["checkpoint"]))


@pytest.mark.slow
def test_new_interactions_of_known_items_proceed_and_export_the_same_ids(trained, restore_data, tmp_path, caplog):
    before = export_checkpoint(trained["checkpoint"], tmp_path / "before", ExportOptions(top_k=5)).path
    header, first, *rest = inter_file(trained).read_text().splitlines()
    user, item, rating, stamp = first.split("\t")
    with open(inter_file(trained), "a") as f:
        f.write(f"{user}\t{item}\t{rating}\t{int(float(stamp)) + 1}\n")  # a known user re-rates a known item
    after = export_checkpoint(trained["checkpoint"], tmp_path / "after", ExportOptions(top_k=5)).path
    tokens = [json.loads((a / "metadata.json").read_text())["item_tokens"] for a in (before, after)]
    assert tokens[0] == tokens[1]
    assert "changed since training, but every user and item keeps its id" in caplog.text


@pytest.mark.slow
def test_evaluate_and_export_from_another_folder_take_data_path(trained, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(trained["data"], moved)
    original = trained["data"].rename(trained["data"].with_name("data-away"))
    try:
        missing = cli("evaluate", f"--checkpoint={trained['checkpoint']}")
        assert_one_line_error(missing, "not found", "data_path")
        found = cli("evaluate", f"--checkpoint={trained['checkpoint']}", f"--data_path={moved}", "--eval_batch_size=64")
        assert found.returncode == 0, found.stderr[-2000:]
        assert "test result" in found.stdout + found.stderr
        exported = cli("export", "--checkpoint", str(trained["checkpoint"]), "--output", str(tmp_path / "art"),
                       f"--data_path={moved}")
        assert exported.returncode == 0, exported.stderr[-2000:]
        assert_one_line_error(cli("evaluate", f"--checkpoint={trained['checkpoint']}", "data_path"), "--key=value")
    finally:
        original.rename(trained["data"])


class _Payload:
    def __init__(self, sentinel: pathlib.Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.sentinel, "ran"))


@pytest.mark.slow
def test_a_dataset_pickle_left_in_checkpoint_dir_is_not_loaded(data_root, tmp_path):
    """RecBole unpickles <checkpoint_dir>/<dataset>-<Class>.pth (and -dataloader.pth) whenever one exists."""
    saved = tmp_path / "saved"
    saved.mkdir()
    sentinel = tmp_path / "sentinel"
    for name in ("ml-tiny-SequentialDataset.pth", "ml-tiny-for-BERTRec-dataloader.pth"):
        (saved / name).write_bytes(pickle.dumps(_Payload(sentinel)))
    run_recbole(model="BERTRec", dataset="ml-tiny", config_dict={
        **TINY, "data_path": str(data_root), "checkpoint_dir": str(saved), "save_model": False})
    assert not sentinel.exists()
