"""init_from: a checkpoint's weights start a run on newer data, item rows carried by raw token (issue 37)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from conftest import CATALOGUE_MODEL, best_checkpoint, train_checkpoint, write_ml100k_slice
from recbole_llm.errors import RecboleLLMError

OLD_USERS, NEW_USERS = 80, 130  # ml-tiny (the catalogue checkpoint's data), then the data grown by newer users
GONE = ("1", "50", "181")  # items whose interactions all left the newer data: dropped


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> Path:
    """ml-grown: the first 130 users of ml-100k; GONE's interactions and rows removed; five new films, each
    the first item of some of the newer users; rows in reverse order so that RecBole numbers every item
    differently from ml-tiny (the catalogue checkpoint's data)."""
    root = tmp_path_factory.mktemp("grown")
    folder = write_ml100k_slice(root, "ml-grown", NEW_USERS)
    inter, item = folder / "ml-grown.inter", folder / "ml-grown.item"
    header, *rows = inter.read_text().splitlines()
    rows = [row for row in rows if row.split("\t")[1] not in GONE]
    first = {}
    for row in rows:
        user, _, _, when = row.split("\t")
        first[user] = min(first.get(user, 2**40), int(when))
    # each newer user's first film: in the training split
    rows += [f"{user}\tnew-{int(user) % 5}\t4\t{when - 1}" for user, when in first.items() if int(user) > OLD_USERS]
    inter.write_text("\n".join([header, *reversed(rows)]) + "\n")
    header, *films = item.read_text().splitlines()
    films = [row for row in films if row.split("\t")[0] not in GONE]
    films += [f"new-{k}\tA New Film Part {k}\t1998\tDrama Sci-Fi" for k in range(5)]
    item.write_text("\n".join([header, *films]) + "\n")
    return root


def grown_config(grown: Path, tmp_path: Path, checkpoint, **overrides) -> dict:
    return {"data_path": str(grown), **CATALOGUE_MODEL, "init_from": str(checkpoint), "show_progress": False,
            "checkpoint_dir": str(tmp_path / "saved"), "state": "warning", **overrides}


def build(config_dict: dict, model_name: str = "BERTRec"):
    from recbole.utils import get_model

    config = Config(model=model_name, dataset="ml-grown", config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    return config, dataset, get_model(model_name)(config, train_data._dataset)


@pytest.mark.slow
def test_items_keep_their_vectors_by_token_new_ones_start_fresh_from_text_gone_ones_drop(
        serving_artifacts, grown, tmp_path):
    """Every item in both datasets has exactly its trained vector (ID row, text part, cap) under its new internal
    id; an item new to the data starts as its text under the checkpoint's centre (a zero ID part); the
    encoder and projections are the checkpoint's; the summary counts what was carried, new and dropped; the
    lineage names the checkpoint's digest."""
    from recbole_llm.checkpoint import lineage
    from recbole_llm.checkpoint.init_from import initialise
    from recbole_llm.checkpoint.loading import load_for_comparison
    from recbole_llm.export.pipeline import load_for_export

    checkpoint = serving_artifacts["catalogue_checkpoint"]
    _, old, old_data, _ = load_for_export(checkpoint)
    config, dataset, model = build(grown_config(grown, tmp_path, checkpoint))
    fresh = model.item_embedding.weight.detach().clone()
    summary = initialise(model, config, dataset, load_for_comparison)
    before = [str(t) for t in old_data.field2id_token["item_id"]]
    now = [str(t) for t in dataset.field2id_token["item_id"]]
    both, new, gone = set(before[1:]) & set(now[1:]), set(now[1:]) - set(before), set(before[1:]) - set(now)
    assert set(GONE) <= gone and new and sum(before.index(t) != now.index(t) for t in both) > len(both) / 2
    assert f"{len(both)} carried by token, {len(new)} new (from their text), {len(gone)} dropped" in summary
    model.eval()
    with torch.no_grad():
        table, old_table = model.item_table(), old.item_table()
        rows_now, rows_then = [now.index(t) for t in sorted(both)], [before.index(t) for t in sorted(both)]
        # the trained parts exactly; the text part is the frozen encoder's again, in other batches: float rounding
        assert torch.equal(model.item_embedding.weight[rows_now], old.item_embedding.weight[rows_then])
        trained_then, trained_now = old.item_trained[rows_then], model.item_trained[rows_now]
        assert trained_now[trained_then].all() and (trained_now & ~trained_then).any()  # trained stays trained
        same = trained_now == trained_then  # (an item first trained now has its ID part switched on)
        assert torch.allclose(table[rows_now][same], old_table[rows_then][same], rtol=0, atol=1e-6)
        new_rows = [now.index(t) for t in sorted(new)]
        assert not model.item_embedding.weight[new_rows].any() and fresh[new_rows].any()  # their text alone
        assert model.item_trained[new_rows].all()  # they have interactions now: their ID part trains
        tower = old.text_tower()(model.text_input_ids[new_rows], model.text_attention_mask[new_rows])
        text = model.text_projection(model.text_embeddings[new_rows])
        assert torch.allclose(text, tower, atol=1e-5)  # as add-items would give them: the trained centre
    for name, tensor in old.state_dict().items():
        if name.startswith(("encoder.", "text_projection", "pre_encoder", "lstm")):
            assert torch.equal(model.state_dict()[name], tensor), name
    parent = lineage.parent(config)
    assert parent["sha256"] == hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    assert parent["checkpoint"] == Path(checkpoint).name and parent["from"] is None


@pytest.mark.slow
def test_a_run_from_init_from_trains_and_its_artifact_records_the_lineage(serving_artifacts, grown, tmp_path,
                                                                         caplog):
    """run_recbole with init_from trains on the grown data (the summary logged), and export writes the
    checkpoint it started from into metadata.json; resumed with resume_from (the same command), init_from is not
    read again and the lineage stays."""
    from recbole_llm.export import ExportOptions, export_checkpoint

    checkpoint = serving_artifacts["catalogue_checkpoint"]
    with caplog.at_level(logging.INFO):
        train_checkpoint(tmp_path / "run", "BERTRec", "ml-grown", grown_config(
            grown, tmp_path / "run", checkpoint, state="info"))
    assert f"init_from {Path(checkpoint).name}: " in caplog.text and "carried by token" in caplog.text
    # the run resumed (same command and resume_from): init_from is not read again, the lineage stays
    (latest,) = (tmp_path / "run" / "saved").glob("*-latest.pth")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train_checkpoint(tmp_path / "run", "BERTRec", "ml-grown", grown_config(
            grown, tmp_path / "run", checkpoint, state="info", epochs=2, resume_from=str(latest)))
    assert "carried by token" not in caplog.text and "Resume" in caplog.text
    child = best_checkpoint(tmp_path / "run" / "saved")
    # resumed again once finished: nothing to train, and the best checkpoint is left as it is (RecBole would
    # save the model as "epoch -1" over it)
    best = child.read_bytes()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train_checkpoint(tmp_path / "run", "BERTRec", "ml-grown", grown_config(
            grown, tmp_path / "run", checkpoint, state="info", epochs=2, resume_from=str(latest)))
    assert "nothing to train" in caplog.text and child.read_bytes() == best
    artifact = export_checkpoint(child, tmp_path / "artifact", ExportOptions()).path
    lineage = json.loads((artifact / "metadata.json").read_text())["lineage"]
    assert lineage["sha256"] == hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    assert lineage["dataset"] == "ml-tiny" and lineage["items"] > 0


def run_cli(*args: str, cwd: Path) -> tuple[int, str]:
    """``recbole-llm run`` in this process (its exit code and stderr), from ``cwd``."""
    import contextlib
    import io

    from recbole_llm.cli import main

    here, err = os.getcwd(), io.StringIO()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err):
            code = main(["run", *args])
    finally:
        os.chdir(here)
    return code, err.getvalue()


@pytest.mark.slow
def test_what_cannot_carry_over_is_refused_in_one_line_and_nothing_is_written(serving_artifacts, grown, tmp_path):
    """A missing file, a RecBole model, another plugin model, another item representation or text, a
    checkpoint of a model the plugin does not own, data with no item in common, another width, adapters scaled
    otherwise: exit 2, one line, no checkpoint."""
    checkpoint = serving_artifacts["catalogue_checkpoint"]
    base = {"data_path": grown, "dataset": "ml-grown", "epochs": 1, "item_text_max_tokens": 16,
            "pretrained_model_name_or_path": None, "n_layers": 1, "hidden_size": 32, "inner_size": 64,
            "text_model_name_or_path": CATALOGUE_MODEL["text_model_name_or_path"],
            "MAX_ITEM_LIST_LENGTH": 12, "item_repr": "id+text", "item_text_fields": "['movie_title','class']",
            "text_projection": "frozen", "id_max_norm": 0.5, "init_from": checkpoint,
            "load_col": "{'inter':['user_id','item_id','timestamp'],'item':['item_id','movie_title','class']}"}

    def args(**changes) -> list[str]:
        return [f"--{key}={value}" for key, value in {**base, **changes}.items()]

    sasrec = train_checkpoint(tmp_path / "sasrec", "SASRec", "ml-grown", {
        "data_path": str(grown), "epochs": 1, "hidden_size": 16, "inner_size": 32, "n_layers": 1,
        "MAX_ITEM_LIST_LENGTH": 12, "train_neg_sample_args": None, "loss_type": "CE"})
    # the same items under other tokens: nothing in common
    foreign = tmp_path / "foreign"
    write_ml100k_slice(foreign, "ml-grown", 40)
    for suffix, column in (("inter", 1), ("item", 0)):
        path = foreign / "ml-grown" / f"ml-grown.{suffix}"
        header, *rows = path.read_text().splitlines()
        rows = ["\t".join(f"x{v}" if i == column else v for i, v in enumerate(r.split("\t"))) for r in rows]
        path.write_text("\n".join([header, *rows]) + "\n")
    # another sentence encoder for the item text (a tiny one, saved here with the same tokenizer)
    from transformers import AutoTokenizer, BertConfig, BertModel

    from recbole_llm.model.backbone import resolve_pretrained

    other_text = tmp_path / "other-text-model"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(other_text)
    AutoTokenizer.from_pretrained(resolve_pretrained(base["text_model_name_or_path"])).save_pretrained(other_text)
    cases = [
        (args(init_from=tmp_path / "nothing.pth"), "init_from '", "is not a file"),
        (args(text_model_name_or_path=other_text), "embedded item text with another text model",
         "set --text_model_name_or_path"),
        (args(model="SASRec"), "init_from starts a plugin model", "SASRec is RecBole's"),
        (args(model="BERTLoRA"), "holds a BERTRec, this run builds a BERTLoRA", ""),
        (args(item_repr="text", id_max_norm=None), "item_repr='id+text'", "item_repr='text'"),
        (args(item_text_fields="['movie_title']"), "item_text_fields=", "set --item_text_fields"),
        (args(init_from=sasrec), "is a SASRec checkpoint, a model the plugin does not own", ""),
        (args(data_path=foreign), "shares no item with 'ml-grown'", ""),
    ]
    lora = {"model": "BERTLoRA", "dataset": "ml-grown", "data_path": grown, "epochs": 1,
            "pretrained_model_name_or_path": None, "hidden_size": 32, "inner_size": 64, "n_layers": 1,
            "MAX_ITEM_LIST_LENGTH": 12, "init_from": serving_artifacts["checkpoint"]}  # as conftest's SERVING_MODEL
    cases += [
        ([f"--{k}={v}" for k, v in {**lora, "hidden_size": 64}.items()], "does not fit the model built here: ",
         "set the widths and adapters it was trained with"),
        ([f"--{k}={v}" for k, v in {**lora, "lora_alpha": 64}.items()], "lora_alpha=16, this run has lora_alpha=64", ""),
    ]
    for i, (given, fragment, more) in enumerate(cases):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        code, err = run_cli(*given, f"--checkpoint_dir={folder / 'saved'}", cwd=folder)
        lines = [line for line in err.splitlines() if line.startswith("recbole-llm: error")]
        assert code == 2 and len(lines) == 1 and fragment in lines[0] and more in lines[0], (given, err[-800:])
        assert not list(folder.rglob("*.pth")), given


def test_resume_from_wins_over_init_from_and_a_bad_value_is_one_line():
    from recbole_llm.checkpoint.init_from import check_init_from
    from recbole_llm.checkpoint.loading import load_for_comparison

    resumed = {"init_from": "gone.pth", "resume_from": "saved/x-latest.pth"}
    assert check_init_from(resumed, "BERTRec", load_for_comparison) is None
    assert check_init_from({"init_from": None}, "BERTRec", load_for_comparison) is None
    with pytest.raises(RecboleLLMError, match=r"init_from=5 is not a path"):
        check_init_from({"init_from": 5}, "BERTRec", load_for_comparison)


def test_a_bundled_model_and_its_installed_folder_are_the_same_model():
    from recbole_llm.checkpoint.init_from import _meaning
    from recbole_llm.model.backbone import canonical_model, resolve_pretrained

    name, key = CATALOGUE_MODEL["text_model_name_or_path"], "pretrained_model_name_or_path"
    assert canonical_model(name) == canonical_model(resolve_pretrained(name) + "/") != canonical_model("other/model")
    assert _meaning(key, name) == _meaning(key, resolve_pretrained(name)) != _meaning(key, "other/model")


@pytest.mark.slow
def test_the_text_model_is_known_by_its_weights_not_its_folder(serving_artifacts, grown, tmp_path):
    """A checkpoint's text model moved to another folder is the same model: init_from (checked before any data
    is read), evaluate and export take it. Another model of any width is refused in one line, by its weights."""
    import shutil

    from recbole_llm.checkpoint.init_from import check_init_from
    from recbole_llm.checkpoint.loading import load_for_comparison
    from recbole_llm.export.pipeline import load_for_export
    from recbole_llm.model.backbone import resolve_pretrained

    from recbole_llm.checkpoint.format import atomic_save, load

    moved = tmp_path / "moved-minilm"
    shutil.copytree(resolve_pretrained(CATALOGUE_MODEL["text_model_name_or_path"]), moved)
    state = load(serving_artifacts["catalogue_checkpoint"])  # trained with a text model whose folder is gone now
    state["config"].final_config_dict["text_model_name_or_path"] = str(tmp_path / "gone-minilm")
    checkpoint = tmp_path / "trained-elsewhere.pth"
    atomic_save(state, checkpoint)
    with pytest.raises(RecboleLLMError, match=r"the checkpoint's text model '.*gone-minilm' is neither a folder here"):
        load_for_export(checkpoint)  # evaluate and export load by its name: a name that is no folder is refused
    final = Config(model="BERTRec", dataset="ml-grown", config_dict=grown_config(
        grown, tmp_path, checkpoint, text_model_name_or_path=str(moved))).final_config_dict
    assert check_init_from(final, "BERTRec", load_for_comparison)["config"]["dataset"] == "ml-tiny"
    _, model, _, _ = load_for_export(checkpoint, {"text_model_name_or_path": str(moved)})
    assert model.text_model_name_or_path == str(moved)
    with pytest.raises(RecboleLLMError, match=r"the checkpoint's item text was embedded by '.*gone-minilm', so "
                                              r"text_model_name_or_path cannot be null for it"):
        load_for_export(checkpoint, {"text_model_name_or_path": None})  # not "use the default MiniLM"
    with pytest.raises(RecboleLLMError, match="text_model_name_or_path cannot be null for it"):
        load_for_export(checkpoint, {"text_model_name_or_path": "None"})  # as the command line gives it

    other = tmp_path / "other"  # as wide as the MiniLM (384), other weights
    from transformers import AutoTokenizer, BertConfig, BertModel

    BertModel(BertConfig(hidden_size=384, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
              ).save_pretrained(other)
    AutoTokenizer.from_pretrained(moved).save_pretrained(other)
    with pytest.raises(RecboleLLMError, match=r"item texts were embedded by another text model than '.*other' "
                                              r"\(its weights differ\): set text_model_name_or_path"):
        load_for_export(checkpoint, {"text_model_name_or_path": str(other)})
