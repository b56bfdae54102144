"""Shared fixtures: a slice of RecBole's bundled ml-100k, a tiny random encoder, and exported artifacts.

Tests run RecBole's real code paths on a few hundred users so that the whole suite stays within minutes
on two CPU cores. Each test runs in its own working folder, so RecBole's log/, log_tensorboard/ and saved/
never land in the repository.

The serving tests need only artifacts: with ``RECBOLE_LLM_TEST_ARTIFACTS`` set to a folder written by
``python tests/conftest.py FOLDER`` (in an environment with torch), they run in a serving install without
torch or RecBole (CI does so); otherwise the artifacts are built here, once per session.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import pytest

import recbole_llm  # noqa: F401  (registers the plugin before any RecBole call)

SLICE_USERS = 300  # "ml-slice": enough for models to learn beyond popularity in a few epochs
TINY_USERS = 80  # "ml-tiny": for tests that need a trained checkpoint, not a good one


def write_ml100k_slice(folder: Path, name: str, n_users: int) -> Path:
    """The first ``n_users`` users of RecBole's bundled ml-100k, as RecBole atomic files ``name.inter``/``.item``."""
    import recbole

    source = Path(recbole.__file__).parent / "dataset_example" / "ml-100k"
    target = folder / name
    target.mkdir(parents=True, exist_ok=True)
    header, *rows = (source / "ml-100k.inter").read_text().splitlines()
    users = sorted({row.split("\t", 1)[0] for row in rows}, key=int)[:n_users]
    keep = set(users)
    lines = [header] + [row for row in rows if row.split("\t", 1)[0] in keep]
    (target / f"{name}.inter").write_text("\n".join(lines) + "\n")
    item_text = (source / "ml-100k.item").read_text()
    (target / f"{name}.item").write_text(item_text)
    return target


def histories_from_file(data_root, name: str) -> dict[str, list[str]]:
    """Each user's item tokens in time order, read from ``name.inter``."""
    header, *rows = (data_root / name / f"{name}.inter").read_text().splitlines()
    fields = [field.split(":")[0] for field in header.split("\t")]
    records = [dict(zip(fields, row.split("\t"))) for row in rows]
    by_user = collections.defaultdict(list)
    for place, record in enumerate(records):
        by_user[record["user_id"]].append((float(record["timestamp"]), place, record["item_id"]))
    return {user: [item for *_, item in sorted(events)] for user, events in by_user.items()}


def write_pre_split(folder: Path, name: str, histories: dict[str, list[str]], train_prefixes: bool) -> dict:
    """RecBole pre-split files ``name.{train,valid,test}.inter`` (``benchmark_filename``) in ``folder/name``
    from each user's items in time order: the last item is the test target, the one before the validation
    target, the one before that the training target (or, with ``train_prefixes``, every earlier item).
    Returns {part: [(user, history, target)]}."""
    target = folder / name
    target.mkdir(parents=True, exist_ok=True)
    parts = {"train": [], "valid": [], "test": []}
    for user, items in histories.items():
        ends = range(1, len(items) - 2) if train_prefixes else [len(items) - 3]
        parts["train"] += [(user, items[:end], items[end]) for end in ends]
        parts["valid"].append((user, items[:-2], items[-2]))
        parts["test"].append((user, items[:-1], items[-1]))
    for part, rows in parts.items():
        lines = ["user_id:token\titem_id_list:token_seq\titem_id:token"]
        lines += [f"{user}\t{' '.join(history)}\t{item}" for user, history, item in rows]
        (target / f"{name}.{part}.inter").write_text("\n".join(lines) + "\n")
    return parts


def train_checkpoint(folder: Path, model: str, dataset: str, config_dict: dict) -> Path:
    """``run_recbole`` in ``folder`` (its log/ lands there) with checkpoints in ``folder/saved``; the best one."""
    from recbole.quick_start import run_recbole

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        run_recbole(model=model, dataset=dataset, config_dict={
            "show_progress": False, **config_dict, "checkpoint_dir": str(folder / "saved")})
    finally:
        os.chdir(cwd)
    return best_checkpoint(folder / "saved")


def best_checkpoint(folder: Path, pattern: str = "*.pth") -> Path:
    """The one best-model checkpoint a run wrote to ``folder`` (the plugin trainer also writes -latest.pth)."""
    (found,) = [p for p in Path(folder).glob(pattern) if not p.name.endswith("-latest.pth")]
    return found


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    write_ml100k_slice(root, "ml-slice", SLICE_USERS)
    write_ml100k_slice(root, "ml-tiny", TINY_USERS)
    return root


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # RecBole's Config reads --key=value from sys.argv: pytest's own arguments must not leak in.
    monkeypatch.setattr("sys.argv", ["pytest"])


@pytest.fixture
def base_config(data_root, tmp_path) -> dict:
    """RecBole settings for the slice: leave-one-out, time order, full ranking (RecBole's sequential defaults)."""
    return {
        "data_path": str(data_root),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": 20,
        "checkpoint_dir": str(tmp_path / "saved"),
        "show_progress": False,
        "seed": 2020,
        "topk": [10],
        "metrics": ["Recall", "NDCG"],
        "valid_metric": "NDCG@10",
        "eval_batch_size": 4096,
    }


@pytest.fixture
def tiny_bert(base_config) -> dict:
    """A randomly initialised BERT small enough to train a few epochs on the slice in seconds."""
    return {
        **base_config,
        "pretrained_model_name_or_path": None,
        "n_layers": 1,
        "n_heads": 2,
        "hidden_size": 64,
        "inner_size": 128,
        "hidden_dropout_prob": 0.1,
        "attn_dropout_prob": 0.1,
        "learning_rate": 0.003,
        "train_batch_size": 256,
    }


# Where a model shows it learns beyond popularity: RecBole's bundled ml-100k, all 943 users. On the 300-user
# slice a correctly counted Pop (recbole_llm.patches.models.pop_calculate_loss) is within seed noise of what a tiny
# model reaches in seconds, so "beats Pop" there would prove nothing.
LEARNING_DATASET = "ml-100k"


def bundled(config: dict) -> dict:
    """``config`` for one of RecBole's bundled datasets: without the slices' ``data_path``."""
    return {key: value for key, value in config.items() if key != "data_path"}


@pytest.fixture(scope="session")
def pop_ndcg(tmp_path_factory) -> float:
    """RecBole's Pop on LEARNING_DATASET, with the sequential models' split and evaluator: the floor every
    model must beat there."""
    from recbole.quick_start import run_recbole

    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("pop"))
    try:
        result = run_recbole(
            model="Pop",
            dataset=LEARNING_DATASET,
            config_dict={
                "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
                "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
                "show_progress": False,
                "topk": [10],
                "metrics": ["Recall", "NDCG"],
                "valid_metric": "NDCG@10",
                "epochs": 1,
                "save_model": False,
            },
        )
    finally:
        os.chdir(cwd)
    return result["test_result"]["ndcg@10"]


SERVING_MODEL = {  # BERTLoRA on the random encoder: a real plugin model, trained in seconds
    "pretrained_model_name_or_path": None, "hidden_size": 32, "inner_size": 64, "n_layers": 1,
    "MAX_ITEM_LIST_LENGTH": 12, "epochs": 1, "train_batch_size": 512,
}
SERVING_TOP_K = 5
# BERTRec with item text (the bundled MiniLM, its first layer for the sequence): an item-index artifact whose
# text tower adds items
CATALOGUE_MODEL = {
    # a small random sequence encoder over the whole (384-wide) sentence encoder's item text: decoupled widths
    "pretrained_model_name_or_path": None, "n_layers": 1, "n_heads": 2, "hidden_size": 32, "inner_size": 64,
    "text_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
    "item_repr": "id+text", "item_text_fields": ["movie_title", "class"],
    "text_projection": "frozen", "id_max_norm": 0.5,  # text-anchored items (Let It Go), new items in their space
    "item_text_max_tokens": 16, "MAX_ITEM_LIST_LENGTH": 12, "epochs": 1, "train_batch_size": 512,
    "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title", "class"]},
}
SERVING_ARTIFACTS = ("scores", "top", "catalogue")


def build_serving_artifacts(folder: Path) -> dict[str, str]:
    """BERTLoRA trained on ml-tiny, exported twice into ``folder``: ``scores`` (every item's score) and ``top``
    (top-5 with exclusions); BERTRec with item text exported with an item index (``catalogue``); their
    checkpoints. Paths as strings."""
    from recbole_llm.export import ExportOptions, export_checkpoint

    folder = Path(folder).resolve()
    write_ml100k_slice(folder / "data", "ml-tiny", TINY_USERS)
    checkpoint = train_checkpoint(folder, "BERTLoRA", "ml-tiny", {
        "data_path": str(folder / "data"), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        **SERVING_MODEL})
    text_checkpoint = train_checkpoint(folder / "text", "BERTRec", "ml-tiny", {
        "data_path": str(folder / "data"), **CATALOGUE_MODEL})
    return {
        "checkpoint": str(checkpoint),
        "scores": str(export_checkpoint(checkpoint, folder / "scores", ExportOptions()).path),
        "top": str(export_checkpoint(checkpoint, folder / "top", ExportOptions(top_k=SERVING_TOP_K)).path),
        "catalogue_checkpoint": str(text_checkpoint),
        "catalogue": str(export_checkpoint(text_checkpoint, folder / "catalogue", ExportOptions(item_index=True)).path),
    }


@pytest.fixture(scope="session")
def serving_artifacts(tmp_path_factory) -> dict[str, str]:
    """{"scores": artifact folder, "top": top-k artifact folder, "catalogue": item-index artifact folder}: from
    RECBOLE_LLM_TEST_ARTIFACTS, or built (then also their checkpoints)."""
    given = os.environ.get("RECBOLE_LLM_TEST_ARTIFACTS")
    if given:
        found = {name: str(Path(given, name).resolve()) for name in SERVING_ARTIFACTS}
        missing = [path for path in found.values() if not Path(path, "metadata.json").is_file()]
        if missing:
            raise pytest.UsageError(f"RECBOLE_LLM_TEST_ARTIFACTS: no artifact at {missing[0]}; write them with "
                                    f"python tests/conftest.py {given}")
        return found
    return build_serving_artifacts(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="session")
def artifact(serving_artifacts) -> str:
    """An artifact that scores every item (BERTLoRA on ml-tiny); a test module may define its own."""
    return serving_artifacts["scores"]


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network


# Fixtures that train a model or export artifacts, these sessions' and the test modules' own (by name): a test
# using one (directly or through another fixture) is slow, whatever its own body does. Tests that train in
# their body carry @pytest.mark.slow.
TRAINING_FIXTURES = {
    "pop_ndcg", "serving_artifacts",  # here
    "trained",  # test_bad_input, test_world
    "real_checkpoint",  # test_checkpoint_safety
    "sampled_checkpoint",  # test_data_faithful
    "planted_artifact",  # test_explain
    "checkpoints",  # test_export
    "gpu_checkpoint",  # test_gpu
    "saved_bert",  # test_patches
    "uninterrupted",  # test_resume
    "artifacts",  # test_seen_items
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


if __name__ == "__main__":  # python tests/conftest.py FOLDER: the serving tests' artifacts, for another venv
    print(build_serving_artifacts(Path(sys.argv[1])))
