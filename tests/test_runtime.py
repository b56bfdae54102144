"""The runtime on tiny graphs built with onnx.helper: the artifact contract without torch or RecBole.

Each graph scores item i for a history h as sum over h of <E[j], E[i]> (E: a random item table, row 0 zero),
so the right answer is a few lines of numpy. A top-k graph does the exclusions and TopK inside ONNX, as
the exported ones do. Runs in a serving install (onnxruntime, numpy, onnx; CI's slim environment).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recbole_llm.errors import RecboleLLMError
from recbole_llm import artifact
from recbole_llm.serving.runtime import Recommender

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

N_ITEMS, HIDDEN, MAX_LENGTH = 9, 4, 3  # 8 items and padding
TOKENS = [artifact.PADDING_TOKEN] + [f"item-{i}" for i in range(1, N_ITEMS)]


def item_table(seed: int = 0) -> np.ndarray:
    table = np.random.default_rng(seed).normal(size=(N_ITEMS, HIDDEN)).astype(np.float32)
    table[0] = 0  # padding adds nothing
    return table


def expected_scores(table: np.ndarray, history_ids: list[int]) -> np.ndarray:
    return table[history_ids[-MAX_LENGTH:]].sum(axis=0) @ table.T


def write_tiny_artifact(folder: Path, top_k: int | None, table: np.ndarray, **metadata_changes) -> Path:
    """model.onnx and metadata.json keeping the artifact contract, written by hand."""
    names = {spec.name: spec for spec in artifact.input_specs(top_k) + artifact.output_specs(top_k, N_ITEMS)}
    types = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}

    def value_info(name: str):
        spec = names[name]
        return helper.make_tensor_value_info(name, types[spec.dtype], list(spec.shape))

    initializers = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(table.T.copy(), "table_t")]
    nodes = [
        helper.make_node("Gather", ["table", artifact.ITEM_SEQ], ["embedded"]),  # [b, l, h]
        helper.make_node("ReduceSum", ["embedded", "axis_1"], ["user"], keepdims=0),  # [b, h]
        helper.make_node("MatMul", ["user", "table_t"], ["raw_scores"]),  # [b, n]
    ]
    initializers.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis_1"))
    outputs = [artifact.SCORES]
    if top_k is None:
        nodes.append(helper.make_node("Identity", ["raw_scores"], [artifact.SCORES]))
    else:
        padding = np.zeros((1, N_ITEMS), dtype=np.float32)
        padding[0, 0] = -np.inf
        initializers += [numpy_helper.from_array(padding, "padding"),
                         numpy_helper.from_array(np.array(-np.inf, dtype=np.float32), "minus_inf"),
                         numpy_helper.from_array(np.array([top_k], dtype=np.int64), "k")]
        nodes += [
            helper.make_node("Sub", ["raw_scores", "raw_scores"], ["zeros"]),
            helper.make_node("Shape", [artifact.EXCLUDE_ITEMS], ["exclude_shape"]),
            helper.make_node("Expand", ["minus_inf", "exclude_shape"], ["minus_infs"]),
            helper.make_node("ScatterElements", ["zeros", artifact.EXCLUDE_ITEMS, "minus_infs"], ["excluded"], axis=1),
            helper.make_node("Add", ["raw_scores", "excluded"], ["masked_items"]),
            helper.make_node("Add", ["masked_items", "padding"], ["masked"]),
            helper.make_node("TopK", ["masked", "k"], [artifact.TOP_SCORES, artifact.TOP_ITEMS], axis=1),
        ]
        outputs = [artifact.TOP_ITEMS, artifact.TOP_SCORES]
    graph = helper.make_graph(nodes, "tiny", [value_info(n) for n in artifact.input_names(top_k)],
                              [value_info(n) for n in outputs], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every supported ONNX Runtime reads
    onnx.checker.check_model(model)
    metadata = {
        "format_version": artifact.FORMAT_VERSION, "model": "Tiny", "dataset": "none", "max_length": MAX_LENGTH,
        "n_items": N_ITEMS, "top_k": top_k, "precision": "fp32", "inputs": artifact.input_names(top_k),
        "outputs": artifact.output_names(top_k), "item_tokens": TOKENS, **metadata_changes,
    }
    folder.mkdir(parents=True, exist_ok=True)
    # signed as export signs: the graph vouches for metadata.json (no companion files here)
    (folder / artifact.MODEL_FILE).write_bytes(artifact.signed_graph(model.SerializeToString(), metadata, {}))
    (folder / artifact.METADATA_FILE).write_text(json.dumps(metadata))
    return folder


@pytest.mark.parametrize("top_k", [None, 4], ids=["scores", "top-k"])
def test_the_runtime_ranks_tiny_graphs_like_numpy(top_k, tmp_path):
    table = item_table()
    recommender = Recommender(write_tiny_artifact(tmp_path / "a", top_k, table))
    histories = [["item-1", "item-2"], ["item-5", "item-3", "item-8", "item-2"], ["item-7", "nope"]]
    ids = [[TOKENS.index(t) for t in h if t in TOKENS] for h in histories]
    for exclude_seen in (True, False):
        answers = recommender.recommend(histories, k=3, exclude_seen=exclude_seen)
        for answer, history in zip(answers, ids):
            scores = expected_scores(table, history)
            scores[0] = -np.inf
            if exclude_seen:
                scores[history] = -np.inf  # the whole history, also the item beyond the window of 3
            best = np.argsort(-scores, kind="stable")[:3]
            assert answer.items == [TOKENS[i] for i in best]
            assert np.allclose(answer.scores, scores[best], atol=1e-5)
    assert answers[2].unknown_tokens == 1


def test_numpy_post_processing_matches_the_graphs_top_k(tmp_path):
    """artifact.top_k (for graphs that return every score) and the top-k graph agree, exclusions included."""
    import onnxruntime as ort

    table = item_table(seed=3)
    scores_session = ort.InferenceSession(str(write_tiny_artifact(tmp_path / "s", None, table) / "model.onnx"))
    top_session = ort.InferenceSession(str(write_tiny_artifact(tmp_path / "t", 5, table) / "model.onnx"))
    item_seq = np.array([[1, 2, 0], [4, 4, 6], [8, 0, 0]], dtype=np.int64)
    item_length = np.array([2, 3, 1], dtype=np.int64)
    exclude = artifact.exclusions([np.array([1, 2, 3]), np.array([6]), np.array([8])], [True, True, False])
    (scores,) = scores_session.run(None, artifact.feeds(item_seq, item_length))
    items, values = artifact.top_k(scores, 5, exclude)
    graph_items, graph_values = top_session.run(artifact.output_names(5),
                                                artifact.feeds(item_seq, item_length, exclude, top_k=5))
    assert np.array_equal(items, graph_items) and np.allclose(values, graph_values)
    assert not np.isin(items[0], [0, 1, 2, 3]).any() and 8 in items[2]


@pytest.mark.parametrize("change, words", [
    ({"format_version": 1}, "artifact format 1, this runtime reads format 2"),
    ({"format_version": None}, "artifact format None"),
    ({"top_k": 3}, "returns 4 items"),
    ({"item_tokens": TOKENS[:-1], "n_items": N_ITEMS - 1}, "was exported with n_items=9"),
    ({"item_tokens": ["item-0"] + TOKENS[1:]}, "not the padding '[PAD]'"),
    ({"precision": "bf16"}, "precision must be one of"),
    ({"outputs": [1]}, "outputs must be a list of tensor names"),
])
def test_an_artifact_that_breaks_the_contract_fails_at_load(change, words, tmp_path):
    folder = write_tiny_artifact(tmp_path / "a", 4, item_table())
    metadata = json.loads((folder / artifact.METADATA_FILE).read_text())
    (folder / artifact.METADATA_FILE).write_text(json.dumps({**metadata, **change}))
    with pytest.raises(artifact.ArtifactError) as raised:
        Recommender(folder)
    assert words in str(raised.value) and "\n" not in str(raised.value) and "recbole-llm export" in str(raised.value)
    assert isinstance(raised.value, RecboleLLMError)


def test_the_committed_json_schema_is_the_contracts_and_accepts_a_tiny_artifact(tmp_path):
    """export/metadata.schema.json is written from artifact.metadata_schema(); both judge like the runtime."""
    jsonschema = pytest.importorskip("jsonschema")
    committed = json.loads((Path(__file__).parents[1] / "export" / "metadata.schema.json").read_text())
    assert committed == artifact.metadata_schema(), "regenerate: python -m recbole_llm.artifact.metadata > export/metadata.schema.json"
    folder = write_tiny_artifact(tmp_path / "a", None, item_table())
    metadata = json.loads((folder / artifact.METADATA_FILE).read_text())
    jsonschema.validate(metadata, committed)
    for change in ({"format_version": 1}, {"item_tokens": ["x", "a", "a"]}, {"top_k": 0}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**metadata, **change}, committed)
        with pytest.raises(artifact.ArtifactError):
            artifact.check_metadata({**metadata, **change}, "metadata.json")


def test_the_serving_side_imports_neither_torch_nor_recbole(tmp_path):
    folder = write_tiny_artifact(tmp_path / "a", 4, item_table())
    code = ("import sys; from recbole_llm.serving.runtime import Recommender; import recbole_llm.serving.http, recbole_llm.cli; "
            f"print(Recommender({str(folder)!r}).recommend([['item-1']], k=2)[0].items); "
            "print(sorted(m for m in ('torch', 'recbole', 'transformers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines()[-1] == "[]"


def test_the_serving_requirements_are_the_packages_floors():
    """export/requirements-serve.txt (the Dockerfile's and CI's serving install) asks for the versions
    pyproject.toml asks for: one place each."""
    import tomllib

    root = Path(__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["serve"]
    wanted = [line.strip() for line in (root / "export" / "requirements-serve.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert wanted and all(requirement in declared for requirement in wanted), wanted
    assert "requirements-serve.txt" in (root / "export" / "Dockerfile").read_text()


def test_a_graph_without_its_metadata_props_is_refused(tmp_path):
    """Without the graph's own record, an edited metadata.json (here: items reordered) would answer wrongly."""
    folder = write_tiny_artifact(tmp_path / "a", None, item_table())
    model = onnx.load(str(folder / artifact.MODEL_FILE))
    del model.metadata_props[:]
    onnx.save(model, str(folder / artifact.MODEL_FILE))
    metadata = json.loads((folder / artifact.METADATA_FILE).read_text())
    (folder / artifact.METADATA_FILE).write_text(json.dumps({**metadata, "item_tokens": TOKENS[:1] + TOKENS[:0:-1]}))
    with pytest.raises(artifact.ArtifactError, match="does not say which max_length it was exported with"):
        Recommender(folder)


@pytest.mark.parametrize("providers, words", [("CPUExecutionProvider", "must be a non-empty list"),
                                              (["NoSuchExecutionProvider"], "is not available here")])
def test_providers_are_checked_not_silently_replaced(providers, words, tmp_path):
    folder = write_tiny_artifact(tmp_path / "a", None, item_table())
    with pytest.raises(RecboleLLMError, match=words):
        Recommender(folder, providers=providers)


def test_explanations_give_each_history_items_effect_and_rank_a_planted_item_first(tmp_path):
    """In the tiny graph a history item j adds <E[j], E[i]> to item i's score, so leaving it out must lower
    the score by exactly that; an item planted to drive the top recommendation is named first."""
    table = item_table(seed=5)
    table[7] = 6 * table[3]  # item-3 in a history pushes item-7 up, far more than anything else does
    recommender = Recommender(write_tiny_artifact(tmp_path / "a", None, table))
    history = ["item-1", "item-3", "item-5"]
    (answer,) = recommender.recommend([history], k=3, explain=True)
    assert answer.items[0] == "item-7"
    assert [c.item for c in answer.explanations[0]][0] == "item-3"
    for item, contributions in zip(answer.items, answer.explanations):
        want = {token: float(table[TOKENS.index(token)] @ table[TOKENS.index(item)]) for token in history}
        assert sorted(c.item for c in contributions) == sorted(history)
        assert all(abs(c.effect - want[c.item]) < 1e-4 for c in contributions)
        assert [c.effect for c in contributions] == sorted((c.effect for c in contributions), reverse=True)
    # without explain, the same answer and no explanations; a one-item history has nothing to leave out
    (plain,) = recommender.recommend([history], k=3)
    assert plain.items == answer.items and plain.explanations is None
    (single,) = recommender.recommend([["item-2"]], k=2, explain=True)
    assert [[c.item for c in e] for e in single.explanations] == [["item-2"], ["item-2"]]
    assert all(e[0].effect is None for e in single.explanations)


def test_explanations_need_an_artifact_that_scores_every_item(tmp_path):
    recommender = Recommender(write_tiny_artifact(tmp_path / "a", 4, item_table()))
    with pytest.raises(RecboleLLMError, match="export it without --top-k"):
        recommender.recommend([["item-1"]], k=2, explain=True)
    with pytest.raises(RecboleLLMError, match="explain must be True or False"):
        recommender.recommend([["item-1"]], k=2, explain="yes")


@pytest.mark.parametrize("n_items", [5000, 20000])
def test_partial_sort_gives_the_full_sorts_answer_ties_included(n_items):
    """Large catalogues rank with argpartition: the same items as the stable full sort, ties at the k-th score
    (lower id first), exclusions and rows with fewer finite scores than k included."""
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 50, size=(8, n_items)).astype(np.float32)
    scores[3] = 7.0
    scores[4, 100:] = -np.inf
    exclude = rng.integers(0, n_items, size=(8, 30))
    masked = scores.copy()
    np.put_along_axis(masked, exclude, -np.inf, axis=1)
    masked[:, 0] = -np.inf
    for k in (1, 10, 200):
        items, top = artifact.top_k(scores, k, exclude)
        assert (items == np.argsort(-masked, axis=1, kind="stable")[:, :k]).all()
        assert np.array_equal(top, np.take_along_axis(masked, items, axis=1))


# ------------------------------------------------------------------------------------------------------
# explanations in bounded chunks; the served exclude_seen default (issue 33)


class CountingSession:
    """The real ONNX Runtime session, each call's row count noted (a spy: every call still runs)."""

    def __init__(self, session):
        self.session, self.rows = session, []

    def run(self, names, feeds, *args):
        self.rows.append(len(feeds[artifact.ITEM_SEQ]))
        return self.session.run(names, feeds, *args)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_explanations_run_in_bounded_chunks_and_answer_as_one_call_would(tmp_path, monkeypatch):
    """Every history and its leave-one-out variants are scored at most EXPLAIN_CHUNK_ROWS (and
    EXPLAIN_CHUNK_SCORES / items) rows a call; the answers are the same whatever the chunk size."""
    import recbole_llm.serving.explain as explain

    table = item_table(seed=3)
    recommender = Recommender(write_tiny_artifact(tmp_path / "a", None, table))
    histories = [["item-1", "item-2", "item-3"], ["item-4"], ["item-5", "item-6"], ["item-7", "item-8", "item-1"]] * 5
    whole = recommender.recommend(histories, k=4, explain=True)
    encoded = recommender.encode(histories)
    rows = sum(int(n) + 1 if n > 1 else 1 for n in encoded.item_length)  # each history, and it less each item
    assert Recommender.explain_rows(encoded, [True] * len(histories)) == rows
    assert Recommender.explain_rows(encoded, [True, False] * 10) == 5 * (4 + 3)  # histories 0 and 2 of each four
    assert Recommender.explain_effects(encoded, [4] * len(histories), [True] * len(histories)) == \
        4 * int(encoded.item_length.sum())
    for per_call, scores in ((1, 1 << 22), (7, 1 << 22), (256, 3 * N_ITEMS)):
        monkeypatch.setattr(explain, "EXPLAIN_CHUNK_ROWS", per_call)
        monkeypatch.setattr(explain, "EXPLAIN_CHUNK_SCORES", scores)
        spy = recommender.session = CountingSession(recommender.session.session
                                                    if isinstance(recommender.session, CountingSession)
                                                    else recommender.session)
        chunked = recommender.recommend(histories, k=4, explain=True)
        explain_calls = spy.rows[1:]  # the first call ranks
        assert sum(explain_calls) == rows and max(explain_calls) == min(per_call, scores // N_ITEMS), spy.rows
        for got, want in zip(chunked, whole):
            assert got.items == want.items
            for a, b in zip(got.explanations, want.explanations):
                assert [c.item for c in a] == [c.item for c in b]
                assert all(abs(x.effect - y.effect) < 1e-5 for x, y in zip(a, b) if y.effect is not None)


def test_the_served_exclude_seen_default_follows_the_artifact(tmp_path):
    """metadata.json's exclude_seen (export sets it from the training data's repeat_rate) is what a call
    without exclude_seen gets; a one-line notice says where offline and served answers treat repeats apart."""
    from recbole_llm.serving.http import repeat_notice

    history = [["item-1", "item-2", "item-3"]]
    table = item_table(seed=5)
    repeats = Recommender(write_tiny_artifact(tmp_path / "r", None, table, repeat_rate=0.4, exclude_seen=False))
    assert repeats.exclude_seen is False
    assert repeats.recommend(history, k=8) == repeats.recommend(history, k=8, exclude_seen=False)
    assert repeats.recommend(history, k=8) != repeats.recommend(history, k=8, exclude_seen=True)
    assert repeat_notice(repeats).startswith("40.0% of next items in the training data were already in the user's "
                                             "history: exclude_seen defaults to false")
    few = Recommender(write_tiny_artifact(tmp_path / "f", None, table, repeat_rate=0.01, exclude_seen=True))
    assert few.recommend(history, k=8) == few.recommend(history, k=8, exclude_seen=True)
    assert "exclude_seen defaults to true, so answers drop items RecBole's evaluator counted as hits" in \
        repeat_notice(few)
    none = Recommender(write_tiny_artifact(tmp_path / "n", None, table, repeat_rate=0.0, exclude_seen=True))
    unknown = Recommender(write_tiny_artifact(tmp_path / "u", None, table))  # no repeat_rate: drop seen items
    assert repeat_notice(none) is None and repeat_notice(unknown) is None and unknown.exclude_seen is True
    assert artifact.served_exclude_seen(0.049) and not artifact.served_exclude_seen(0.05)
    assert artifact.served_exclude_seen(None)
    with pytest.raises(RecboleLLMError, match="exclude_seen must be True, False or None"):
        repeats.recommend(history, k=3, exclude_seen="no")
    for change, words in (({"repeat_rate": 1.5}, "repeat_rate must be null or a number from 0 to 1"),
                          ({"exclude_seen": "false"}, "exclude_seen must be true or false")):
        with pytest.raises(artifact.ArtifactError, match=words):
            artifact.check_metadata({**repeats.metadata, **change}, "metadata.json")
