"""Bad config values, config files and data files: one line naming the problem and the fix, before any
training, instead of a traceback deep in RecBole (or a run that exits 0 having trained nothing)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from recbole.config import Config
from recbole.data import create_dataset

from recbole_llm import RecboleLLMError
from helpers import assert_one_line_error, cli, slice_args

TINY = {"pretrained_model_name_or_path": None, "n_layers": 1, "hidden_size": 32, "inner_size": 64}


@pytest.mark.parametrize("override, fragment", [
    ({"epochs": "abc"}, "epochs='abc' must be a positive integer"),
    ({"epochs": -1}, "epochs=-1 must be a positive integer"),
    ({"epochs": 0}, "epochs=0 must be a positive integer"),
    ({"learning_rate": 0}, "learning_rate=0 must be a number above 0"),
    ({"learning_rate": -0.1}, "learning_rate=-0.1 must be a number above 0"),
    ({"MAX_ITEM_LIST_LENGTH": 0}, "MAX_ITEM_LIST_LENGTH=0 must be a positive integer"),
    ({"MAX_ITEM_LIST_LENGTH": -5}, "MAX_ITEM_LIST_LENGTH=-5 must be a positive integer"),
    ({"train_batch_size": 0}, "train_batch_size=0 must be a positive integer"),
    ({"eval_batch_size": -1}, "eval_batch_size=-1 must be a positive integer"),
    ({"loss_type": "MSE"}, "loss_type='MSE' is not a loss of sequential models"),
    ({"topk": 0}, "topk=0 must be a positive integer"),
    ({"topk": [10, -1]}, "topk=.10, -1. must be a positive integer"),
    ({"seed": "abc"}, "seed='abc' must be an integer from 0 to 2..32 - 1"),
    ({"seed": -1}, "seed=-1 must be an integer"),
    ({"weight_decay": -1}, "weight_decay=-1 must be a number of 0 or more"),
    ({"stopping_step": -1}, "stopping_step=-1 must be a positive integer"),
    ({"stopping_step": 0}, "stopping_step=0 must be a positive integer"),
    ({"metrics": ["Recall", "NDGC"]}, "metrics: unknown metric 'NDGC'; use names from: .*ndcg"),
    ({"valid_metric": "NDGC@10"}, "valid_metric='NDGC@10' names no metric"),
    # pre-split histories numbered apart from the items: every history would name other items, silently
    ({"benchmark_filename": ["train", "valid", "test"]}, "set alias_of_item_id: .item_id_list.$"),
    ({"alias_of_item_id": "item_id_list"}, "alias_of_item_id='item_id_list' must be a list of field names"),
    ({"benchmark_filename": "train", "alias_of_item_id": ["item_id_list"]},
     "benchmark_filename='train' must list the three pre-split files' suffixes"),
    # read by truth: "no" meant yes (a string on the command line, --repeatable=no)
    ({"repeatable": "no"}, "repeatable='no' must be true or false: e.g. --repeatable=False"),
    ({"reproducibility": 0}, "reproducibility=0 must be true or false"),
    # valid_metric RecBole looked up after the first epoch's training
    ({"metrics": ["Recall"]}, "valid_metric='MRR@10' is not among metrics=.'Recall'. .*--valid_metric=Recall@10$"),
    ({"valid_metric": "NDCG@50"}, "valid_metric='NDCG@50' is not among metrics"),
    ({"eval_args": "TO"}, "eval_args='TO' must be a mapping"),
    # RecBole takes any key: --epoch=2 ran the default 300 epochs
    ({"epoch": 2}, "unknown setting 'epoch': did you mean 'epochs'"),
    ({"max_item_list_len": 10}, "unknown setting 'max_item_list_len': did you mean 'MAX_ITEM_LIST_LENGTH'"),
    ({"tail_threshold": "x"}, "tail_threshold='x' must be an integer of 0 or more"),
])
@pytest.mark.parametrize("model", ["BERTRec", "SASRec"])
def test_config_values_are_checked_before_any_data(model, override, fragment, data_root):
    with pytest.raises(RecboleLLMError, match=fragment.replace("(", r"\(")):
        Config(model=model, dataset="ml-tiny", config_dict={"data_path": str(data_root), **TINY, **override})


def test_encoder_limits_are_checked_before_recbole_builds_the_data(data_root):
    """MAX_ITEM_LIST_LENGTH=100000 made RecBole allocate tens of GB building the dataset before the model's
    own check; the pretrained encoder's config.json alone says it has 512 positions."""
    with pytest.raises(RecboleLLMError, match="MAX_ITEM_LIST_LENGTH=100000 exceeds the 512 positions"):
        config = Config(model="BERTLoRA", dataset="ml-tiny", config_dict={
            "data_path": str(data_root), "MAX_ITEM_LIST_LENGTH": 100000})
        create_dataset(config)
    with pytest.raises(RecboleLLMError, match="backbone_layers=9 must be an integer from 1 to 6"):
        Config(model="BERTRec", dataset="ml-tiny", config_dict={"data_path": str(data_root), "backbone_layers": 9})


@pytest.mark.slow
def test_the_random_encoder_bounds_the_history_length_before_any_data(data_root, tmp_path):
    """MAX_ITEM_LIST_LENGTH=100000 on the random encoder made RecBole allocate 79 GB for its prefix rows."""
    with pytest.raises(RecboleLLMError, match="MAX_ITEM_LIST_LENGTH=100000 exceeds the 512 positions of the "
                                              "random encoder"):
        Config(model="BERTRec", dataset="ml-tiny", config_dict={
            "data_path": str(data_root), **TINY, "MAX_ITEM_LIST_LENGTH": 100000})
    result = cli("run", "--model=BERTLoRA", "--dataset=ml-tiny", *slice_args(data_root),
                 "--pretrained_model_name_or_path=None", "--MAX_ITEM_LIST_LENGTH=100000",
                 f"--checkpoint_dir={tmp_path / 'saved'}")
    assert_one_line_error(result, "MAX_ITEM_LIST_LENGTH=100000 exceeds the 512 positions", "at most 512")
    assert not (tmp_path / "saved").exists()
    Config(model="BERTRec", dataset="ml-tiny", config_dict={
        "data_path": str(data_root), **TINY, "MAX_ITEM_LIST_LENGTH": 512})  # the bound itself is fine


@pytest.mark.slow
@pytest.mark.parametrize("arg, fragment", [
    ("--seed=abc", "seed='abc' must be an integer"),
    ("--weight_decay=-1", "weight_decay=-1 must be a number of 0 or more"),
    ("--stopping_step=-1", "stopping_step=-1 must be a positive integer"),
    ("--metrics=['Recall','Precison']", "unknown metric 'Precison'"),
])
def test_bad_training_settings_on_the_command_line_are_one_line(arg, fragment, data_root, tmp_path):
    result = cli("run", "--model=BERTRec", "--dataset=ml-tiny", *slice_args(data_root), arg,
                 f"--checkpoint_dir={tmp_path / 'saved'}")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "saved").exists()


@pytest.mark.slow
def test_the_command_line_refuses_bad_values_with_one_line(data_root, tmp_path):
    result = cli("run", "--model=BERTRec", "--dataset=ml-tiny", *slice_args(data_root), "--epochs=-1",
                 f"--checkpoint_dir={tmp_path / 'saved'}")
    assert_one_line_error(result, "epochs=-1 must be a positive integer")
    assert not (tmp_path / "saved").exists()  # nothing trained, nothing written


@pytest.mark.slow
@pytest.mark.parametrize("text, fragment", [
    ("epochs: 1\n  hidden_size: [32\n", "is not valid YAML at line"),
    ("- epochs\n- 1\n", "holds a list, not a mapping"),
    ("just words", "holds a str, not a mapping"),
])
def test_config_files_that_do_not_parse_name_file_and_line(text, fragment, data_root, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(RecboleLLMError, match=f"config file '{bad}' {fragment}"):
        Config(model="BERTRec", dataset="ml-tiny", config_file_list=[str(bad)],
               config_dict={"data_path": str(data_root), **TINY})
    assert_one_line_error(cli("run", "--model=BERTRec", "--dataset=ml-tiny", f"--config_files={bad}",
                              *slice_args(data_root)), str(bad))


def dataset_with(tmp_path: Path, data_root: Path, inter: bytes | None = None, item: bytes | None = None) -> str:
    folder = tmp_path / "ml-bad"
    folder.mkdir(exist_ok=True)
    source = data_root / "ml-tiny"
    (folder / "ml-bad.inter").write_bytes(inter if inter is not None else (source / "ml-tiny.inter").read_bytes())
    if item is not None:
        (folder / "ml-bad.item").write_bytes(item)
    return str(tmp_path)


def load(data_path: str, **extra):
    config = Config(model="BERTRec", dataset="ml-bad", config_dict={
        "data_path": data_path, **TINY, "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, **extra})
    return create_dataset(config)


GOOD_ROWS = b"1\t10\t5\t881250949\n1\t11\t3\t881250950\n2\t10\t4\t881250951\n"


@pytest.mark.parametrize("inter, fragment", [
    (b"user_id:token\trating:float\ttimestamp:float\n1\t5\t881250949\n", "has no 'item_id' field"),
    (b"user_id\titem_id:token\trating:float\ttimestamp:float\n" + GOOD_ROWS, "header field 1 'user_id' has no type"),
    (b"user_id:token\titem_id:thing\trating:float\ttimestamp:float\n" + GOOD_ROWS, "unknown type 'thing'"),
    (b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t5\t881250949\n2\t11\t4\tyesterday\n",
     "line 3, field 'timestamp' (float): 'yesterday' is not a number"),
    (b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n", "has a header but no rows"),
    (b"", "is empty"),
    (b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t5\t881250949\n2\t\xff\xfe\t4\t88125\n",
     "line 3 is not utf-8 text"),
    (b"user_id:token\titem_id:token\trating:float\n1\t10\t5\n2\t11\t4\n", "has no 'timestamp' field, which sequential"),
])
def test_data_files_fail_with_one_line_naming_file_and_place(inter, fragment, data_root, tmp_path):
    data_path = dataset_with(tmp_path, data_root, inter=inter)
    with pytest.raises(RecboleLLMError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as caught:
        load(data_path)
    assert "ml-bad.inter" in str(caught.value) and "\n" not in str(caught.value)


HEADER = b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


@pytest.mark.parametrize("inter, fragment", [
    (b"user_id:token\titem_id:token\titem_id:token\ttimestamp:float\n" + GOOD_ROWS,
     "the header names 'item_id' twice (fields 2 and 3): rename or remove one"),
    (HEADER + GOOD_ROWS + b"3\t" + b"7" * (20 << 20) + b"\t4\t881250952\n",
     "line 5, field 'item_id' is 20,971,520 characters long, over the 131,072 the reader takes"),
    (HEADER + GOOD_ROWS + b'3\t"12\t4\t881250952\n4\t10\t4\t881250953\n',
     "line 5, field 'item_id' has an unclosed quote"),
])
def test_header_and_field_problems_are_one_line(inter, fragment, data_root, tmp_path):
    data_path = dataset_with(tmp_path, data_root, inter=inter)
    with pytest.raises(RecboleLLMError, match=re.escape(fragment)) as caught:
        load(data_path)
    assert "ml-bad.inter" in str(caught.value) and "\n" not in str(caught.value)


def test_a_utf8_byte_order_mark_before_the_header_is_accepted(data_root, tmp_path):
    """Excel and Notepad write one; RecBole made it part of the first field's name ('\ufeffuser_id')."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "marked").mkdir()
    plain = load(dataset_with(tmp_path / "plain", data_root))
    marked = load(dataset_with(tmp_path / "marked", data_root, inter=b"\xef\xbb\xbf" + (
        data_root / "ml-tiny" / "ml-tiny.inter").read_bytes()))
    assert list(marked.inter_feat.columns) == list(plain.inter_feat.columns)
    assert marked.inter_feat.equals(plain.inter_feat)
    assert marked.config["encoding"] == plain.config["encoding"]  # as the user set it (here: unset)


def test_sequential_models_load_the_time_field_even_when_load_col_leaves_it_out(data_root, tmp_path):
    data_path = dataset_with(tmp_path, data_root)
    dataset = load(data_path, load_col={"inter": ["user_id", "item_id"]})
    assert "timestamp" in dataset.inter_feat


# ---------------------------------------------------------------------------------------------------------
# weights that do not fit, full disks and leftovers, export arguments


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory) -> dict[str, Path]:
    """BERTRec and Pop trained briefly on a private copy of ml-tiny (so the test may change its files)."""
    from conftest import train_checkpoint

    folder = tmp_path_factory.mktemp("trained")
    shutil.copytree(data_root / "ml-tiny", folder / "data" / "ml-tiny")
    common = {"data_path": str(folder / "data"), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
              "MAX_ITEM_LIST_LENGTH": 10, "epochs": 1}
    found = {name: train_checkpoint(folder / name, name, "ml-tiny", {**common, **extra})
             for name, extra in (("BERTRec", TINY), ("SASRec", {"hidden_size": 32, "inner_size": 64}), ("Pop", {}))}
    found["data"] = folder / "data"
    return found


@pytest.mark.slow
def test_resuming_from_weights_of_another_dataset_or_model_says_what_does_not_match(trained, data_root, tmp_path):
    common = ["--model=BERTRec", f"--data_path={data_root}", "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}",
              "--pretrained_model_name_or_path=None", "--n_layers=1", "--hidden_size=32", "--inner_size=64",
              "--MAX_ITEM_LIST_LENGTH=10", "--epochs=2", "--show_progress=False", f"--checkpoint_dir={tmp_path}"]
    other_data = cli("run", "--dataset=ml-slice", *common, f"--resume_from={trained['BERTRec']}")
    assert_one_line_error(other_data, "was trained on data whose ids differ from this run's")
    other_model = cli("run", "--dataset=ml-tiny", *common, f"--resume_from={trained['SASRec']}")
    assert_one_line_error(other_model, "does not fit the model built here")


@pytest.mark.slow
def test_an_older_checkpoint_after_the_item_count_changed_says_what_does_not_match(trained, tmp_path):
    """A checkpoint from before recbole_llm.checkpoint.lineage (no id maps in it): the weights' shapes tell."""
    import torch
    from recbole.quick_start import load_data_and_model

    from recbole_llm import load_checkpoint

    checkpoint = load_checkpoint(trained["BERTRec"])  # ours, written by the fixture
    del checkpoint["config"].recbole_llm_world
    older = tmp_path / "older.pth"
    torch.save(checkpoint, older, pickle_protocol=4)
    inter = trained["data"] / "ml-tiny" / "ml-tiny.inter"
    original = inter.read_text()
    try:
        inter.write_text(original + "1\t99999\t5\t999999999\n")  # a new item appended after training
        with pytest.raises(RecboleLLMError, match=r"does not fit the model built here: .* is \[\d+, 32\] in the "):
            load_data_and_model(str(older))
        assert_one_line_error(cli("evaluate", f"--checkpoint={older}"), "does not fit")
    finally:
        inter.write_text(original)


FULL_DISK_SAVE = """
import resource, signal, sys, torch
from recbole_llm.checkpoint.format import atomic_save
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
atomic_save({"state_dict": {"w": torch.zeros(100_000)}}, sys.argv[1])
"""


@pytest.mark.slow
def test_a_full_disk_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path):
    import os
    import subprocess
    import sys

    import torch

    from recbole_llm.checkpoint.format import atomic_save, load

    path = tmp_path / "model.pth"
    atomic_save({"state_dict": {"w": torch.ones(3)}}, path)
    # the kernel refuses the write part-way: one line, no .partial left, the previous checkpoint whole
    full = subprocess.run([sys.executable, "-c", FULL_DISK_SAVE, str(path)], capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 1 and full.stderr.strip().splitlines()[-1].startswith(
        "recbole_llm.errors.CheckpointError: could not write checkpoint"), full.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]
    assert torch.equal(load(path)["state_dict"]["w"], torch.ones(3))
    # whatever else stops a save (Ctrl-C here), the temporary file goes and the previous one stays
    real_fsync = os.fsync
    def interrupted(fd):
        raise KeyboardInterrupt
    os.fsync = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_save({"state_dict": {"w": torch.zeros(3)}}, path)
    finally:
        os.fsync = real_fsync
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]
    # a link left where the old code put its temporary file is neither followed nor touched
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("the user's file")
    os.symlink(outside, f"{path}.partial")
    atomic_save({"state_dict": {"w": torch.zeros(3)}}, path)
    assert outside.read_text() == "the user's file" and not path.is_symlink()
    assert torch.equal(load(path)["state_dict"]["w"], torch.zeros(3))
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as open() would have made it


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_export_refuses_bad_outputs_and_models_before_loading(trained, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert_one_line_error(cli("export", "--checkpoint", str(trained["BERTRec"]), "--output", str(a_file / "art")),
                          "which is a file")
    assert_one_line_error(cli("export", "--checkpoint", str(trained["BERTRec"]), "--output", "/proc/no/art"),
                          "cannot be created")
    assert_one_line_error(cli("export", "--checkpoint", str(trained["Pop"]), "--output", str(tmp_path / "pop")),
                          "Pop is not a sequential model")
    assert not (tmp_path / "pop").exists()


@pytest.mark.slow
def test_export_cleans_up_what_killed_exports_left(trained, tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    left = tmp_path / f".art.partial-{dead.pid}-abc123"
    (left / "half").mkdir(parents=True)
    swapped = tmp_path / f".art.old-{dead.pid}"
    swapped.mkdir()
    result = cli("export", "--checkpoint", str(trained["BERTRec"]), "--output", str(tmp_path / "art"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "art" / "model.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_pre_split_histories_longer_than_the_window_train_and_export_at_the_window(data_root, tmp_path):
    """benchmark_filename data keeps each history's full item list (here up to hundreds of items) while
    MAX_ITEM_LIST_LENGTH is 10: the model reads the most recent 10, the export says 10."""
    import json
    import os

    from recbole.quick_start import run_recbole

    from conftest import best_checkpoint, histories_from_file, write_pre_split
    from recbole_llm.export import ExportOptions, export_checkpoint

    histories = histories_from_file(data_root, "ml-tiny")
    write_pre_split(tmp_path, "ml-bench", histories, train_prefixes=False)
    longest = max(len(items) for items in histories.values()) - 1
    assert longest > 100
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = run_recbole(model="BERTRec", dataset="ml-bench", config_dict={
            "data_path": str(tmp_path), **TINY, "MAX_ITEM_LIST_LENGTH": 10, "epochs": 1, "show_progress": False,
            "benchmark_filename": ["train", "valid", "test"], "alias_of_item_id": ["item_id_list"],
            "load_col": {"inter": ["user_id", "item_id_list", "item_id"]},
            "checkpoint_dir": str(tmp_path / "saved")})
    finally:
        os.chdir(cwd)
    assert result["test_result"]["ndcg@10"] >= 0
    artifact = export_checkpoint(best_checkpoint(tmp_path / "saved"), tmp_path / "art", ExportOptions(top_k=5)).path
    metadata = json.loads((artifact / "metadata.json").read_text())
    assert metadata["max_length"] == 10 and metadata["validation"][0]["passed"]


@pytest.mark.slow
def test_export_force_replaces_artifacts_only(trained, tmp_path, monkeypatch):
    precious = tmp_path / "work"
    (precious / "notes").mkdir(parents=True)
    (precious / "notes" / "thesis.txt").write_text("years of work")
    assert_one_line_error(cli("export", "--checkpoint", str(trained["BERTRec"]), "--output", str(precious), "--force"),
                          "is not an artifact")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert_one_line_error(cli("export", "--checkpoint", str(trained["BERTRec"]), "--output", str(a_file), "--force"),
                          "is not an artifact")
    assert (precious / "notes" / "thesis.txt").read_text() == "years of work" and a_file.read_text() == "x"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_resuming_on_data_whose_ids_moved_is_refused(trained, tmp_path):
    """Same shapes, other ids: the weights would load and silently score other items."""
    moved = tmp_path / "data" / "ml-tiny"
    moved.mkdir(parents=True)
    header, *rows = (trained["data"] / "ml-tiny" / "ml-tiny.inter").read_text().splitlines()
    (moved / "ml-tiny.inter").write_text("\n".join([header, *reversed(rows)]) + "\n")
    result = cli("run", "--model=BERTRec", "--dataset=ml-tiny", f"--data_path={tmp_path / 'data'}",
                 "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}", "--pretrained_model_name_or_path=None",
                 "--n_layers=1", "--hidden_size=32", "--inner_size=64", "--MAX_ITEM_LIST_LENGTH=10", "--epochs=2",
                 "--show_progress=False", f"--checkpoint_dir={tmp_path / 'saved'}",
                 f"--resume_from={trained['BERTRec']}")
    assert_one_line_error(result, "was trained on data whose ids differ from this run's")


@pytest.mark.parametrize("override, fragment", [
    ({"n_heads": 0}, "n_heads=0 must be a positive integer: e.g. n_heads: 2 (for the random encoder"),
    ({"hidden_size": -32}, "hidden_size=-32 must be a positive integer"),
    ({"hidden_dropout_prob": 2}, "hidden_dropout_prob=2 must be a number in [0, 1)"),
    ({"attn_dropout_prob": -0.1}, "attn_dropout_prob=-0.1 must be a number in [0, 1)"),
])
def test_random_encoder_sizes_and_dropouts_are_checked(override, fragment, data_root):
    with pytest.raises(RecboleLLMError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Config(model="BERTRec", dataset="ml-tiny", config_dict={"data_path": str(data_root), **TINY, **override})


@pytest.mark.slow
def test_command_line_usage_errors_are_one_line(data_root, trained):
    assert_one_line_error(cli("run", "--nproc=abc"), "invalid int value")
    assert_one_line_error(cli("export", "--opset", "abc", "--checkpoint", "x", "--output", "y"), "invalid int value")
    assert_one_line_error(cli("evaluate"), "--checkpoint")
    assert_one_line_error(cli("run", "--model=BERTRec", "--epochs=1", "--epochs=2"), "--epochs is given twice")
    for bad in ("--eval_batch_size=0", "--topk=0"):  # settings for a checkpoint go through the same checks
        assert_one_line_error(cli("evaluate", f"--checkpoint={trained['BERTRec']}", bad), "must be a positive integer")
    assert_one_line_error(cli("evaluate", f"--checkpoint={trained['BERTRec']}", "--model=SASRec"), "cannot change")


def test_settings_no_code_reads_are_named_and_peft_arguments_are_known(data_root, caplog):
    """A key far from every known one may be a custom model's: a warning naming it, not an error. BERTPEFT
    passes a peft method's own arguments through, so they are known keys."""
    given = {"data_path": str(data_root), **TINY}
    Config(model="BERTRec", dataset="ml-tiny", config_dict={**given, "my_own_setting": 1})
    assert "settings my_own_setting are in no RecBole, plugin or model YAML" in caplog.text
    caplog.clear()
    Config(model="BERTPEFT", dataset="ml-tiny", config_dict={**given, "peft_type": "LOHA", "alpha": 8,
                                                              "rank_dropout": 0.1, "module_dropout": 0.0})
    assert "no RecBole, plugin or model YAML" not in caplog.text
    # another model's key is no misspelling: one config file often serves several (GRU4Rec reads num_layers)
    Config(model="GRU4Rec", dataset="ml-tiny", config_dict={**given, "n_layers": 2})
    assert "no RecBole, plugin or model YAML" not in caplog.text


def test_a_command_line_value_may_hold_an_equals_sign(data_root, tmp_path, monkeypatch):
    """RecBole split --key=value at every '=' and dropped the setting with a warning: /data/day=1 was lost."""
    folder = tmp_path / "day=1"
    monkeypatch.setattr("sys.argv", ["run", f"--checkpoint_dir={folder}", "--epochs=3"])
    config = Config(model="BERTRec", dataset="ml-tiny", config_dict={"data_path": str(data_root), **TINY})
    assert (config["checkpoint_dir"], config["epochs"]) == (str(folder), 3)


def test_a_data_path_holding_ml_100k_is_read(tmp_path):
    """RecBole points ml-100k at its bundled copy whatever data_path says; a user's own ml-100k is read."""
    (tmp_path / "mine" / "ml-100k").mkdir(parents=True)
    config = Config(model="BERTRec", dataset="ml-100k", config_dict={**TINY, "data_path": str(tmp_path / "mine")})
    assert config["data_path"] == str(tmp_path / "mine" / "ml-100k")
    bundled = Config(model="BERTRec", dataset="ml-100k", config_dict={**TINY, "data_path": str(tmp_path)})
    assert Path(bundled["data_path"]).resolve().parts[-2:] == ("dataset_example", "ml-100k")  # none there


@pytest.mark.parametrize("change, fragment", [
    ("token", "the pre-split files' history column item_id_list is typed token: give each row's history as a "
              "column 'item_id_list:token_seq'"),
    ("alias", "alias_of_item_id names 'item_list', which no loaded file has"),
])
def test_pre_split_histories_of_another_type_or_field_are_one_line(data_root, tmp_path, change, fragment):
    """A history column typed token made each whole history one made-up item (then an IndexError in
    training); an alias naming no loaded field failed in RecBole's KeyError."""
    from conftest import histories_from_file, write_pre_split
    from recbole_llm.errors import DataError

    write_pre_split(tmp_path, "pre", histories_from_file(data_root, "ml-tiny"), train_prefixes=False)
    aliases = ["item_id_list"]
    if change == "token":
        for part in ("train", "valid", "test"):
            path = tmp_path / "pre" / f"pre.{part}.inter"
            path.write_text(path.read_text().replace("item_id_list:token_seq", "item_id_list:token"))
    else:
        aliases.append("item_list")
    config = Config(model="BERTRec", dataset="pre", config_dict={
        "data_path": str(tmp_path), **TINY, "MAX_ITEM_LIST_LENGTH": 10, "load_col": None,
        "benchmark_filename": ["train", "valid", "test"], "alias_of_item_id": aliases})
    with pytest.raises(DataError, match=re.escape(fragment)) as error:
        create_dataset(config)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_checkpoint_settings_and_weights_that_would_mislead_are_refused(trained, tmp_path):
    """A misspelt override was set and never read; "no" for a true/false key meant yes; NaN weights made
    every score NaN and RecBole's evaluator ranked items in an arbitrary order, with no error."""
    from recbole_llm.checkpoint.format import atomic_save
    from recbole_llm.checkpoint.loading import load_checkpoint
    from recbole_llm.checkpoint.overrides import apply_overrides
    from recbole_llm.errors import CheckpointError, ConfigError

    state = load_checkpoint(trained["BERTRec"])
    with pytest.raises(CheckpointError, match=r"--eval_bach_size is no setting of this checkpoint's Config"):
        apply_overrides(state["config"], {"eval_bach_size": "8"})
    with pytest.raises(ConfigError, match="repeatable='no' must be true or false"):
        apply_overrides(state["config"], {"repeatable": "no"})
    apply_overrides(state["config"], {"eval_batch_size": "8", "repeatable": "False"})
    assert (state["config"]["eval_batch_size"], state["config"]["repeatable"]) == (8, False)
    name = next(key for key, value in state["state_dict"].items() if value.is_floating_point())
    state["state_dict"][name] = state["state_dict"][name].clone()
    state["state_dict"][name].view(-1)[0] = float("nan")
    atomic_save(state, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=f"nan.pth' holds NaN weights in '{re.escape(name)}'"):
        load_checkpoint(tmp_path / "nan.pth")


def test_a_checkpoint_folder_and_an_empty_output_are_named_for_what_they_are(tmp_path):
    from recbole_llm.checkpoint.loading import check_exists
    from recbole_llm.export.options import check_output

    with pytest.raises(RecboleLLMError, match="is a folder: pass the .pth file"):
        check_exists(tmp_path)
    with pytest.raises(RecboleLLMError, match="--output is empty"):  # not "exists": "" is the current folder
        check_output("", force=False)


def test_each_kind_of_bad_input_has_its_own_error_type(base_config, data_root, tmp_path):
    """Callers (and the HTTP service) tell failures apart by type, never by message text."""
    from recbole_llm.errors import CheckpointError, ConfigError, DataError, ItemExistsError, InputError
    from recbole_llm.checkpoint.loading import load_checkpoint

    with pytest.raises(ConfigError, match="learning_rate=0 must be a number above 0"):
        Config(model="BERTRec", dataset="ml-slice", config_dict={**base_config, **TINY, "learning_rate": 0})
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    broken = tmp_path / "broken" / "broken"
    broken.mkdir(parents=True)
    (broken / "broken.inter").write_text("user_id:token\titem_id:token\n1\n", encoding="utf-8")
    with pytest.raises(DataError):
        create_dataset(Config(model="BERTRec", dataset="broken",
                              config_dict={**base_config, **TINY, "data_path": str(tmp_path / "broken")}))
    assert issubclass(ItemExistsError, InputError) and all(
        issubclass(kind, RecboleLLMError) for kind in (CheckpointError, ConfigError, DataError, InputError))
