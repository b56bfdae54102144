"""A living catalogue: items added to an exported artifact from their text score as the PyTorch model scores
them, the update is written atomically, and bad new items are refused in one line."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recbole_llm import RecboleLLMError
from recbole_llm.export import ExportOptions, export_checkpoint
from recbole_llm.export.options import check_options
from recbole_llm.serving.runtime import Recommender

STAR_WARS = {"movie_title": "Star Wars (1977)", "class": "Action Adventure Romance Sci-Fi War"}
NEW = {"new-1": "Star Wars: Episode IX (2019), Action Adventure Sci-Fi", "new-2": STAR_WARS,
       "new-3": "Toy Story 3 (2010), Animation Children Comedy"}


@pytest.fixture(scope="module")
def pytorch_model(serving_artifacts):
    from recbole_llm.export.pipeline import load_for_export

    _, model, _, _ = load_for_export(serving_artifacts["catalogue_checkpoint"])
    return model


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


@pytest.mark.slow
def test_new_items_score_as_the_pytorch_model_scores_them(serving_artifacts, pytorch_model):
    """New items' rows come from the text tower alone; recommended and read in histories, their scores match
    PyTorch given the same text (its tokenizer, its text tower, the table extended by their rows) within 1e-4."""
    from transformers import AutoTokenizer

    from recbole_llm.model.backbone import resolve_pretrained

    recommender = Recommender(serving_artifacts["catalogue"])
    before = len(recommender.tokens)
    ids = recommender.add_items(NEW)
    assert ids == list(range(before, before + 3)) and recommender.tokens[-3:] == list(NEW)
    history = ["50", "181", "new-1", "172", "new-3"]  # new items as history items too
    [answer] = recommender.recommend([history], k=recommender.max_k, exclude_seen=False)
    got = dict(zip(answer.items, answer.scores))
    assert set(NEW) <= set(got)

    model = pytorch_model
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(model.text_model_name_or_path))
    texts = [NEW["new-1"], ", ".join(STAR_WARS.values()), NEW["new-3"]]  # as item_texts joins fields
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=model.item_text_max_tokens,
                        return_tensors="pt")
    with torch.no_grad():
        table = torch.cat([model.item_table(), model.text_tower()(encoded["input_ids"], encoded["attention_mask"])])
        table[0] = 0
        seq = torch.tensor([[recommender.token_to_id[t] for t in history]])
        expected = (model.user_vectors(seq, torch.tensor([len(history)]), table) @ table.T)[0].numpy()
    diffs = [abs(expected[recommender.token_to_id[token]] - score) for token, score in got.items()]
    assert max(diffs) < 1e-4, max(diffs)
    # the same text as fields or as a joined string is the same item: the same vector
    assert np.allclose(recommender.item_vectors[ids[1]], recommender.vectors_from_text([texts[1]])[0], atol=1e-6)


@pytest.mark.slow
def test_text_anchored_checkpoint_and_one_from_before_the_cap_each_score_as_trained(
        serving_artifacts, pytorch_model, tmp_path):
    """The catalogue model trains text-anchored (frozen text projection, id_max_norm 0.5): its trained items' rows
    stay within the cap of their text vectors. A checkpoint written before the keys existed (its config without
    them) loads as it trained, uncapped: its table is the plain sum of ID and text."""
    from recbole_llm.checkpoint.format import atomic_save, load
    from recbole_llm.export.pipeline import load_for_export

    model = pytorch_model
    assert model.id_max_norm == 0.5 and not model.text_projection.weight.requires_grad
    with torch.no_grad():
        text = model.text_projection(model.text_embeddings)
        correction = (model.item_table() - text).norm(dim=-1)[model.item_trained & model.item_has_text]
        assert (correction <= 0.5 * text.norm(dim=-1)[model.item_trained & model.item_has_text] * (1 + 1e-5)).all()
    state = load(serving_artifacts["catalogue_checkpoint"])
    # which items trained an ID is saved with a capped model, as trained (not re-read from later data)
    assert torch.equal(state["state_dict"].pop("item_trained"), model.item_trained)
    for key in ("id_max_norm", "id_dropout_prob", "text_projection"):
        del state["config"].final_config_dict[key]
    old = tmp_path / "before-the-cap.pth"
    atomic_save(state, old)
    _, uncapped, _, _ = load_for_export(old)
    assert uncapped.id_max_norm is None and uncapped.id_dropout_prob == 0.0
    with torch.no_grad():
        expected = uncapped.item_embedding.weight + uncapped.text_projection(uncapped.text_embeddings)
        has_text = uncapped.item_has_text
        assert torch.equal(uncapped.item_table()[has_text], expected[has_text])


@pytest.mark.slow
def test_add_items_command_writes_the_update_atomically(serving_artifacts, tmp_path):
    """recbole-llm add-items: a new folder with --output, else the artifact replaced whole; a refused file
    leaves the artifact as it was."""
    import shutil

    artifact = tmp_path / "catalogue"
    shutil.copytree(serving_artifacts["catalogue"], artifact)
    items = tmp_path / "items.tsv"
    items.write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"  # ml-100k's
                     "new-1\tStar Wars: Episode IX (2019)\t2019\tAction Adventure Sci-Fi\n"  # .item: the year is
                     "new-2\tToy Story 3 (2010)\t2010\tAnimation Children Comedy\n")  # no text field, left out
    command = [sys.executable, "-m", "recbole_llm", "add-items"]
    copy = subprocess.run([*command, str(artifact), str(items), "--output", str(tmp_path / "copy")],
                          capture_output=True, text=True)
    assert copy.returncode == 0, copy.stderr
    updated = Recommender(tmp_path / "copy")
    assert updated.tokens[-2:] == ["new-1", "new-2"] and updated.metadata["items_added"] == 2
    assert len(Recommender(artifact).tokens) == len(updated.tokens) - 2  # --output left the source alone

    before = folder_digest(artifact)
    bad = tmp_path / "bad.tsv"
    bad.write_text("item_id\tmovie_title\nnew-9\tA film\nnew-9\tThe same token\n")
    refused = subprocess.run([*command, str(artifact), str(bad)], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "line 3" in refused.stderr
    assert folder_digest(artifact) == before
    assert not [p for p in tmp_path.glob(".catalogue.*") if not p.name.endswith(".lock")]

    for output, fragment in ((artifact / "inside", "inside the artifact"), (items / "sub", "could not write")):
        refused = subprocess.run([*command, str(artifact), str(items), "--output", str(output)], capture_output=True,
                                 text=True)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and fragment in refused.stderr
    assert folder_digest(artifact) == before

    # a second writer of the same folder that loaded it before the first wrote is refused, not lost
    early, late = Recommender(artifact), Recommender(artifact)
    early.add_items({"early": "A film (2001), Drama"})
    late.add_items({"late": "Another film (2002), Comedy"})
    early.save(artifact, replace=True)
    with pytest.raises(RecboleLLMError, match="changed since it was loaded"):
        late.save(artifact, replace=True)
    assert Recommender(artifact).tokens[-1] == "early"

    in_place = subprocess.run([*command, str(artifact), str(items)], capture_output=True, text=True)
    assert in_place.returncode == 0, in_place.stderr
    assert "text from movie_title, class" in in_place.stdout  # the model's field order
    assert Recommender(artifact).tokens == updated.tokens[:-2] + ["early"] + updated.tokens[-2:]
    assert not [p for p in tmp_path.glob(".catalogue.*") if not p.name.endswith(".lock")]
    again = subprocess.run([*command, str(artifact), str(items)], capture_output=True, text=True)
    assert again.returncode == 2 and "already in the artifact" in again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("items, fragment", [
    ({"50": "An old token"}, "already in the artifact"),
    ({"7777": "a film", 7777: "the same token as an integer"}, "given twice"),
    ({"new": "   "}, "has no text"),
    ({"new": {"movie_title": ""}}, "has no text"),
    ({"new": {"director": "Someone"}}, "not one of the model's text fields"),
    ({"new": 5}, "must be a string or a mapping"),
    ({"": "a film"}, "non-empty string"),
    ({"[PAD]": "a film"}, "padding token"),
    ({" 50": "a film"}, "surrounding spaces"),
    ({"a\tb": "a film"}, "control character"),
    ({"new": "a\ud800b"}, "lone UTF-16 surrogate"),
    ({}, "non-empty mapping"),
    (["new", "a film"], "non-empty mapping"),
])
def test_bad_new_items_are_refused_and_nothing_is_added(serving_artifacts, items, fragment):
    recommender = Recommender(serving_artifacts["catalogue"])
    before = len(recommender.tokens)
    with pytest.raises(RecboleLLMError, match=fragment) as refused:
        recommender.add_items(items)
    assert "\n" not in str(refused.value) and len(recommender.tokens) == before


@pytest.mark.slow
def test_only_item_index_artifacts_with_text_take_new_items(serving_artifacts, tmp_path):
    """The scores artifact keeps its table inside its graph; an id-only model exported with an item index
    ranks like its scores artifact but has no text to make a new item from."""
    with pytest.raises(RecboleLLMError, match="export it with --item-index"):
        Recommender(serving_artifacts["scores"]).add_items({"new": "a film"})
    id_only = export_checkpoint(serving_artifacts["checkpoint"], tmp_path / "ids", ExportOptions(item_index=True))
    assert id_only.metadata["text_tower"] is None and (tmp_path / "ids" / "item_vectors.npy").is_file()
    indexed, scores = Recommender(tmp_path / "ids"), Recommender(serving_artifacts["scores"])
    histories = [["50", "181", "172"], ["1", "2"]]
    for a, b in zip(indexed.recommend(histories, k=10), scores.recommend(histories, k=10)):
        assert a.items == b.items and np.allclose(a.scores, b.scores, atol=1e-5)
    with pytest.raises(RecboleLLMError, match="no item text"):
        indexed.add_items({"new": "a film"})


@pytest.mark.parametrize("option", [{"top_k": 5}, {"int8": True}, {"triton": True}])
def test_item_index_excludes_graph_side_ranking_and_int8(option):
    with pytest.raises(RecboleLLMError, match="--item-index and"):
        check_options(ExportOptions(item_index=True, **option))


@pytest.mark.slow
def test_approximate_retrieval_returns_the_exact_top_10_on_a_small_catalogue(serving_artifacts):
    """retrieval='ann' (faiss HNSW over the item table) answers as exact retrieval on the bundled catalogue,
    exclusions included, and finds items added afterwards."""
    exact = Recommender(serving_artifacts["catalogue"])
    approximate = Recommender(serving_artifacts["catalogue"], retrieval="ann")
    rng = np.random.default_rng(0)
    real = exact.tokens[1:]
    histories = [[real[i] for i in rng.integers(0, len(real), size=rng.integers(1, 30))] for _ in range(64)]
    for seen in (True, False):
        got = approximate.recommend(histories, k=10, exclude_seen=seen)
        want = exact.recommend(histories, k=10, exclude_seen=seen)
        recall = np.mean([len(set(g.items) & set(w.items)) / 10 for g, w in zip(got, want)])
        assert recall >= 0.99, recall
        assert all(np.allclose(g.scores, w.scores, atol=1e-5) for g, w in zip(got, want) if g.items == w.items)
        if seen:
            assert all(not set(g.items) & set(h) for g, h in zip(got, histories))
    for recommender in (exact, approximate):
        recommender.add_items({"new-1": "Star Wars (1977), Action Adventure Romance Sci-Fi War"})
    [a], [e] = approximate.recommend([["50"]], k=exact.max_k, exclude_seen=False), exact.recommend(
        [["50"]], k=50, exclude_seen=False)
    assert "new-1" in a.items and ("new-1" in a.items[:50]) == ("new-1" in e.items)
    with pytest.raises(RecboleLLMError, match="export the model with --item-index"):
        Recommender(serving_artifacts["scores"], retrieval="ann")
    with pytest.raises(RecboleLLMError, match="retrieval 'fast' is not supported"):
        Recommender(serving_artifacts["catalogue"], retrieval="fast")
