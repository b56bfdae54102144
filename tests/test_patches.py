"""The one layer of RecBole patches: each installed once and naming a real RecBole line, every checkpoint read
once, the export hook on RecBole's models, and no import cycle among the plugin's modules."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
import torch

import recbole_llm
from conftest import train_checkpoint
from recbole_llm import RecboleLLMError, patches
from recbole_llm.checkpoint.loading import load_for_use

PACKAGE = Path(recbole_llm.__file__).parent


# ---------------------------------------------------------------------------------------------------------
# the patch list


def test_every_patch_names_a_real_recbole_line_and_is_installed_once():
    import recbole

    root = Path(recbole.__file__).parent.parent
    for patch in patches.patches():
        where = re.match(r"(recbole/[\w/]+\.py):(\d+)", patch.answers)
        assert where, f"{patch.name}: {patch.answers!r} names no RecBole file and line"
        lines = (root / where.group(1)).read_text(encoding="utf-8").splitlines()
        line = lines[int(where.group(2)) - 1].strip()
        assert line.startswith(("def ", "class ")) or patch.name in line, (patch.name, line)
        installed = patch.owner.__dict__.get(patch.name) if patch.add else getattr(patch.owner, patch.name)
        assert getattr(installed, patches.MARK, False), f"{patch.name} is not installed"

    before = {(id(p.owner), p.name): getattr(p.owner, p.name) for p in patches.patches()}
    patches.install()  # a second install changes nothing: no wrapper around a wrapper
    assert before == {(id(p.owner), p.name): getattr(p.owner, p.name) for p in patches.patches()}


def test_recbole_functions_stay_reachable_and_rebound_everywhere():
    from recbole.quick_start import quick_start
    from recbole.utils import utils

    assert quick_start.load_data_and_model.__wrapped__.__module__ == "recbole.quick_start.quick_start"
    for module in ("recbole.utils", "recbole.utils.logger", "recbole.trainer.trainer", "recbole.data.utils"):
        assert __import__(module, fromlist=["ensure_dir"]).ensure_dir is utils.ensure_dir


@pytest.mark.parametrize("labels", ["sampled", "rating threshold"])
def test_pop_counts_every_training_interaction_once(base_config, data_root, labels):
    """RecBole's Pop added one per distinct item of a batch and counted sampled negatives: its ranking
    changed with the seed and batch size. The right count is the training split's own item counts, whatever
    labels the rows carry (a rating threshold's label 0 is still an interaction)."""
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.general_recommender.pop import Pop

    counts = []
    for seed, batch in ((2020, 64), (2021, 4096)):
        settings = {**base_config, "seed": seed, "train_batch_size": batch, "use_gpu": False,
                    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"}}
        if labels == "rating threshold":  # no sampling: RecBole keeps rating < 4 as label 0
            settings.update(load_col={"inter": ["user_id", "item_id", "rating", "timestamp"]},
                            threshold={"rating": 4}, train_neg_sample_args=None)
        config = Config(model="Pop", dataset="ml-tiny", config_dict=settings)
        train_data, _, _ = data_preparation(config, create_dataset(config))
        item_field = config["ITEM_ID_FIELD"]
        expected = torch.bincount(train_data._dataset.inter_feat[item_field], minlength=train_data._dataset.item_num)
        model, recbole_pop = Pop(config, train_data._dataset), Pop(config, train_data._dataset)
        for batch_data in train_data:
            assert (batch_data[config["LABEL_FIELD"]] == 0).any()  # sampled negatives, or disliked items
            model.calculate_loss(batch_data)
            Pop.calculate_loss.__wrapped__(recbole_pop, batch_data)
        assert torch.equal(model.item_cnt.squeeze(-1), expected)
        assert not torch.equal(recbole_pop.item_cnt.squeeze(-1), expected)  # what the patch answers
        counts.append(model.item_cnt)
    assert torch.equal(counts[0], counts[1])


def test_bert4rec_export_scores_are_its_full_sort_predict(base_config):
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender.bert4rec import BERT4Rec
    from recbole.model.sequential_recommender.sasrec import SASRec

    config = Config(model="BERT4Rec", dataset="ml-tiny", config_dict={
        **base_config, "n_layers": 1, "hidden_size": 16, "inner_size": 32, "MAX_ITEM_LIST_LENGTH": 6})
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    model = BERT4Rec(config, train_data._dataset).eval()
    item_seq = torch.randint(1, model.n_items, (5, 6))
    item_length = torch.tensor([1, 2, 3, 5, 6])
    item_seq[torch.arange(6) >= item_length.unsqueeze(-1)] = 0  # right-padded, as RecBole feeds it
    with torch.no_grad():
        expected = model.full_sort_predict({model.ITEM_SEQ: item_seq, model.ITEM_SEQ_LEN: item_length})
        assert torch.allclose(model.export_scores(item_seq, item_length), expected, atol=1e-5)
    assert "export_scores" in BERT4Rec.__dict__ and "export_scores" not in SASRec.__dict__


# ---------------------------------------------------------------------------------------------------------
# each checkpoint read once


@pytest.fixture(scope="module")
def saved_bert(data_root, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("read-once")
    return train_checkpoint(folder, "BERTRec", "ml-tiny", {
        "data_path": str(data_root), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "pretrained_model_name_or_path": None, "n_layers": 1, "n_heads": 2, "hidden_size": 32,
        "inner_size": 64, "MAX_ITEM_LIST_LENGTH": 8, "train_batch_size": 256, "epochs": 1,
        "eval_batch_size": 4096, "topk": [10], "metrics": ["NDCG"], "valid_metric": "NDCG@10",
    })


@pytest.fixture
def reads(monkeypatch):
    """Reads of each checkpoint file, counted where they happen: torch's own load (RecBole's .pth) and the
    pickle-free format's (the plugin trainer's files)."""
    from recbole_llm.checkpoint import format as checkpoint_format

    counted: dict[str, int] = {}

    def counting(real):
        def load(f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)):
                key = os.path.realpath(f)
                counted[key] = counted.get(key, 0) + 1
            return real(f, *args, **kwargs)

        return load

    monkeypatch.setattr(torch.serialization, "load", counting(torch.serialization.load))
    monkeypatch.setattr(checkpoint_format, "load", counting(checkpoint_format.load))
    return lambda path: counted.get(os.path.realpath(path), 0)


@pytest.mark.slow
def test_load_data_and_model_reads_the_checkpoint_once(saved_bert, reads):
    from recbole.quick_start import load_data_and_model

    config, model, *_ = load_data_and_model(str(saved_bert))
    assert reads(saved_bert) == 1
    assert config["model"] == "BERTRec" and model.n_items > 1


@pytest.mark.slow
def test_load_for_use_reads_once_applies_overrides_and_checks_before_data(saved_bert, reads, monkeypatch):
    seen = []
    config, model, dataset, train_data, valid_data, test_data = load_for_use(
        saved_bert, {"eval_batch_size": 128}, check=lambda config: seen.append(config["eval_batch_size"]))
    assert reads(saved_bert) == 1
    assert seen == [128] and config["eval_batch_size"] == 128 and test_data is not None

    from recbole.quick_start import quick_start

    def no_data(config):
        raise AssertionError("data built before the check")

    monkeypatch.setattr(quick_start, "create_dataset", no_data)

    def refuse(config):
        raise RecboleLLMError("not for this use")

    with pytest.raises(RecboleLLMError, match="not for this use"):
        load_for_use(saved_bert, check=refuse)
    assert reads(saved_bert) == 2


def test_resume_and_evaluate_read_the_checkpoint_once(saved_bert, reads):
    from recbole.utils import get_trainer

    config, model, _, _, _, test_data = load_for_use(saved_bert)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.resume_checkpoint(saved_bert)  # the plugin trainer's, then RecBole's, on one read
    assert reads(saved_bert) == 2
    trainer.evaluate(test_data, load_best_model=True, model_file=str(saved_bert))
    assert reads(saved_bert) == 3


# ---------------------------------------------------------------------------------------------------------
# no import cycle


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the plugin modules it imports, at module level or inside functions, absolute or relative."""
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from package import submodule` imports the submodule; `from module import name`, the module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_plugin_modules_import_each_other_without_a_cycle():
    edges = import_graph()
    assert "recbole_llm.checkpoint.lineage" in edges["recbole_llm.checkpoint.loading"]  # the graph sees function-level imports
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# The house, bottom to top: a module may import its own folder and any folder on a lower floor, never one
# above. The serving side (artifact, serving) is numpy and ONNX Runtime only: it must install without torch.
FLOORS = {
    "recbole_llm.errors": 0, "recbole_llm.version": 0,
    "recbole_llm.settings": 1, "recbole_llm.artifact": 1, "recbole_llm.model.catalog": 1,
    "recbole_llm.serving": 2, "recbole_llm.model": 2,
    "recbole_llm.config": 3,  # a run's config checked: when a Config is built and when a checkpoint loads
    "recbole_llm.checkpoint": 4,
    "recbole_llm.training": 5,
    "recbole_llm.export": 6,
    "recbole_llm.patches": 7,
    "recbole_llm.cli": 8, "recbole_llm.__main__": 9,
}
SERVING_MAY_IMPORT = ("recbole_llm.errors", "recbole_llm.version", "recbole_llm.artifact", "recbole_llm.serving")


def floor_of(module: str) -> tuple[str, int] | None:
    """(the FLOORS entry a module belongs to, its floor): the longest matching prefix; None for the package."""
    for prefix in sorted(FLOORS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, FLOORS[prefix]
    return None


def longest_path(edges: dict[str, set[str]]) -> list[str]:
    memo: dict[str, list[str]] = {}

    def down(node: str) -> list[str]:
        if node not in memo:
            memo[node] = [node, *max((down(t) for t in edges[node]), key=len, default=[])]
        return memo[node]

    return max((down(n) for n in edges), key=len)


def test_the_package_is_a_house_every_import_goes_down_or_sideways():
    edges = import_graph()
    wrong = []
    for module, targets in sorted(edges.items()):
        if module == "recbole_llm":
            continue  # the package's __init__: the public API's lazy names and the install hook
        source = floor_of(module)
        assert source is not None, f"{module} belongs to no floor: add its folder to FLOORS"
        for target in sorted(targets):
            if target == "recbole_llm":
                wrong.append(f"{module} imports the package root (import what it needs from its module)")
                continue
            place = floor_of(target)
            if place[0] != source[0] and place[1] >= source[1]:
                wrong.append(f"{module} (floor {source[1]}) imports {target} (floor {place[1]})")
            if source[0] in ("recbole_llm.artifact", "recbole_llm.serving") and not target.startswith(
                    SERVING_MAY_IMPORT):
                wrong.append(f"serving-side {module} imports {target}")
            if source[0] == "recbole_llm.model" and target.startswith("recbole_llm.training"):
                wrong.append(f"model {module} imports training's {target}")
    assert not wrong, "\n".join(wrong)
    path = longest_path({m: t - {"recbole_llm"} for m, t in edges.items()})
    assert len(path) <= 8, " -> ".join(path)


def test_no_test_module_imports_another():
    """Shared helpers live in tests/helpers.py (fixtures in conftest.py): a test module is never imported."""
    tests = Path(__file__).parent
    modules = {path.stem for path in tests.glob("test_*.py")}
    wrong = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            wrong += [f"{path.name} imports {name}" for name in names if name.split(".")[0] in modules]
    assert not wrong, wrong


def test_every_fixture_that_trains_or_exports_marks_its_tests_slow():
    """pytest -m 'not slow' stays quick: conftest marks the tests of every fixture that trains or exports."""
    from conftest import TRAINING_FIXTURES

    trains = re.compile(r"\b(train_checkpoint|run_recbole|export_checkpoint|build_serving_artifacts)\(")
    tests = Path(__file__).parent
    unmarked = []
    for path in sorted(tests.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            fixture = isinstance(node, ast.FunctionDef) and any(
                "fixture" in ast.unparse(decorator) for decorator in node.decorator_list)
            if fixture and trains.search(ast.get_source_segment(text, node)) and node.name not in TRAINING_FIXTURES:
                unmarked.append(f"{path.name}: {node.name}")
    assert not unmarked, f"add to conftest.TRAINING_FIXTURES: {unmarked}"
