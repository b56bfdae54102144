"""Item text: pretrained language knowledge for long-tail and cold-start items; F1 and tail metrics."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.evaluator.collector import DataStruct
from recbole.utils import get_model, get_trainer, init_seed

from conftest import best_checkpoint, write_ml100k_slice
from recbole_llm import RecboleLLMError
from recbole_llm.model.backbone import DEFAULT_PRETRAINED
from recbole_llm.training.metrics import F1, TailNDCG, TailRecall

NEW_ITEM = "99999"  # in the item file only: never in an interaction
EMPTY_ITEM = "99998"  # no text at all


@pytest.fixture(scope="module")
def text_root(tmp_path_factory) -> Path:
    """80 users of ml-100k, with a cold-start copy of Star Wars' text and an item without text."""
    root = tmp_path_factory.mktemp("text-data")
    folder = write_ml100k_slice(root, "ml-text", 80)
    item_file = folder / "ml-text.item"
    header, *rows = item_file.read_text().splitlines()
    star_wars = next(row for row in rows if row.startswith("50\t")).split("\t", 1)[1]
    rows += [f"{NEW_ITEM}\t{star_wars}", f"{EMPTY_ITEM}\t\t\t"]
    item_file.write_text("\n".join([header] + rows) + "\n")
    return root


def text_config(text_root, tmp_path, **overrides) -> dict:
    return {
        "data_path": str(text_root),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title", "class"]},
        "MAX_ITEM_LIST_LENGTH": 10,
        "backbone_layers": 1,
        "item_repr": "text",
        "item_text_fields": ["movie_title", "class"],
        "item_text_max_tokens": 16,
        "show_progress": False,
        "checkpoint_dir": str(tmp_path / "saved"),
        "metrics": ["Recall", "NDCG", "F1", "TailNDCG", "TailRecall"],
        "topk": [10],
        "valid_metric": "NDCG@10",
        **overrides,
    }


def build(config_dict: dict, model_name: str = "BERTRec"):
    config = Config(model=model_name, dataset="ml-text", config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(model_name)(config, train_data._dataset)
    return config, dataset, model, train_data, valid_data, test_data


@pytest.mark.slow
def test_text_is_tokenized_once_per_dataset_not_per_batch(text_root, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    calls = []
    original = PreTrainedTokenizerBase.__call__
    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    config, dataset, model, train_data, _, _ = build(text_config(text_root, tmp_path, text_encoder="trained"))
    assert len(calls) == 1
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _, batch in zip(range(2), train_data):  # the trained text encoder runs per step, the tokenizer not
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()
    assert len(calls) == 1
    assert model.text_input_ids.shape == (dataset.item_num, 16)


@pytest.mark.slow
def test_text_mode_scores_a_cold_start_item_above_random(text_root, tmp_path):
    config, dataset, model, train_data, valid_data, test_data = build(
        text_config(text_root, tmp_path, epochs=2, learning_rate=0.002, train_batch_size=256)
    )
    new_id = dataset.field2token_id[dataset.iid_field][NEW_ITEM]
    assert dataset.item_counter.get(new_id, 0) == 0  # never interacted with
    trainer = get_trainer(config["MODEL_TYPE"], "BERTRec")(config, model)
    trainer.fit(train_data, valid_data, show_progress=False)
    result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    assert {"f1@10", "tailndcg@10", "tailrecall@10"} <= set(result)

    model.eval()
    batch = next(iter(test_data))[0]
    with torch.no_grad():
        scores = model.full_sort_predict(batch)
    scores[:, 0] = -torch.inf
    new_scores = scores[:, new_id]
    assert torch.isfinite(new_scores).all()
    ranks = (scores > new_scores.unsqueeze(1)).sum(dim=1).float()  # 0 = ranked first
    assert ranks.mean() < 0.25 * dataset.item_num, ranks.mean()  # random would be about half


@pytest.mark.slow
def test_items_without_text_fall_back_to_their_id(text_root, tmp_path, caplog):
    _, dataset, model, *_ = build(text_config(text_root, tmp_path))
    empty_id = dataset.field2token_id[dataset.iid_field][EMPTY_ITEM]
    assert model.items_without_text >= 1
    assert "have no text in item_text_fields" in caplog.text
    with torch.no_grad():
        assert torch.equal(model.item_table()[empty_id], model.item_embedding.weight[empty_id])


@pytest.mark.slow
def test_text_anchored_items_stay_near_their_text_and_untrained_items_are_their_text(text_root, tmp_path):
    """id+text with id_max_norm: after training hard enough that raw ID rows outgrow the cap, every trained
    item's ID part is within id_max_norm of its text vector's norm (some at the bound); an item with text and no
    interaction is exactly its text vector, which is what the text tower (add-items' path) gives its text;
    id_dropout_prob drops corrections in training only."""
    config, dataset, model, train_data, _, _ = build(text_config(
        text_root, tmp_path, item_repr="id+text", id_max_norm=0.5, id_dropout_prob=0.3, train_batch_size=256))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _, batch in zip(range(4), train_data):
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()
        with torch.no_grad():
            assert not torch.equal(model.item_table(), model.item_table())  # a fresh dropout draw per call
    model.eval()
    with torch.no_grad():
        table = model.item_table()
        text = model.text_projection(model.text_embeddings)
        assert torch.equal(table, model.item_table())  # no dropout at inference
        correction = (table - text).norm(dim=-1)
        limit = 0.5 * text.norm(dim=-1)
        raw = model.item_embedding.weight.norm(dim=-1)
        trained = model.item_trained & model.item_has_text
        assert (correction[trained] <= limit[trained] * (1 + 1e-5)).all()
        assert (raw[trained] > limit[trained]).sum() > 10  # the cap was needed, and held
        new_id = dataset.field2token_id[dataset.iid_field][NEW_ITEM]
        assert not model.item_trained[new_id] and raw[new_id] > 0
        assert torch.equal(table[new_id], text[new_id])  # its untrained ID row plays no part
        tower = model.text_tower()(model.text_input_ids[[new_id]], model.text_attention_mask[[new_id]])
        assert torch.allclose(tower[0], table[new_id], atol=1e-5)


@pytest.mark.slow
def test_token_bag_vectors_are_shared_by_token_and_reach_items_known_only_by_text(text_root, tmp_path):
    """text_token_bag: a trained vector per token of the catalogue's texts, averaged over an item's tokens and
    added to its frozen text vector. An item never trained (a copy of Star Wars' text) gets the bag of its
    tokens, trained on the items that share them; the text tower (add-items' path) gives the same row; a token
    no catalogue text has, and special tokens, add nothing."""
    from transformers import AutoTokenizer

    from recbole_llm.model.backbone import resolve_pretrained

    _, dataset, model, train_data, _, _ = build(text_config(
        text_root, tmp_path, item_repr="id+text", id_max_norm=0.5, text_projection="frozen", text_token_bag=True,
        train_batch_size=256))
    bag = model.token_bag
    assert not bag.embedding.weight.any()  # starts at zero: the model starts as without the bag
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _, batch in zip(range(3), train_data):
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()
    model.eval()
    new_id = dataset.field2token_id[dataset.iid_field][NEW_ITEM]
    star_wars = dataset.field2token_id[dataset.iid_field]["50"]
    with torch.no_grad():
        table = model.item_table()
        text = model.text_projection(model.text_embeddings)
        bags = bag(model.text_input_ids)
        assert bags[new_id].norm() > 0 and torch.equal(bags[new_id], bags[star_wars])  # same tokens, same bag
        assert torch.equal(table[new_id], text[new_id] + bags[new_id])  # never trained: text and bag, no ID
        tower = model.text_tower()(model.text_input_ids[[new_id]], model.text_attention_mask[[new_id]])
        assert torch.allclose(tower[0], table[new_id], atol=1e-5)
        tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(model.pretrained_model_name_or_path))
        unseen = next(i for i in range(1000, len(tokenizer)) if bag.token_rows[i] == 0)
        special = [tokenizer.cls_token_id, tokenizer.sep_token_id]
        assert not bag(torch.tensor([[special[0], unseen, special[1], 0]])).any()
        word = int(model.text_input_ids[star_wars, 1])  # the first word of Star Wars' text
        assert torch.equal(bag(torch.tensor([[special[0], unseen, word, special[1]]])),
                           bag(torch.tensor([[word]])))  # the mean runs over the catalogue's tokens only


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"item_repr": "id+text", "id_max_norm": 0}, "id_max_norm=0 must be a number above 0"),
        ({"item_repr": "id+text", "id_max_norm": -1.0}, "id_max_norm=-1.0 must be a number above 0"),
        ({"item_repr": "id+text", "id_max_norm": "big"}, "id_max_norm='big' must be a number above 0"),
        ({"item_repr": "id+text", "id_dropout_prob": 1.0}, r"id_dropout_prob=1.0 must be a number in \[0, 1\)"),
        ({"item_repr": "id+text", "id_dropout_prob": -0.1}, r"id_dropout_prob=-0.1 must be a number in \[0, 1\)"),
        ({"item_repr": "id+text", "id_max_norm": 0.5, "item_text_fields": None},
         "anchors items at their text, but item_text_fields"),
        ({"text_projection": "learned"}, "text_projection='learned' is not supported; use trained or frozen"),
        ({"item_repr": "id", "id_max_norm": 0.5}, "id_max_norm=0.5 shapes the ID part of item_repr id\\+text"),
        ({"item_repr": "text", "id_dropout_prob": 0.2}, "id_dropout_prob=0.2 shapes the ID part"),
        ({"item_repr": "id+text", "id_max_norm": float("inf")}, "id_max_norm=inf must be a number above 0"),
        ({"item_repr": "id", "text_token_bag": True}, "text_token_bag=True learns vectors of item text tokens"),
        ({"item_repr": "id+text", "text_token_bag": "yes"}, "text_token_bag='yes' must be true or false"),
        # the text model: named, loadable, there at all, and the sequence encoder's own where texts run through it
        ({"pretrained_model_name_or_path": None}, "the sequence encoder is random .* --text_model_name_or_path=sent"),
        ({"text_model_name_or_path": " "}, "text_model_name_or_path=' ' must be a hub id or a folder"),
        ({"text_model_name_or_path": 384}, "text_model_name_or_path=384 must be a hub id or a folder"),
        ({"text_model_name_or_path": "/no/such/encoder"}, "text_model_name_or_path '/no/such/encoder' is not a dir"),
        ({"text_model_name_or_path": "/no/such/encoder", "text_encoder": "Trained"},
         "text_encoder=trained runs item text through the sequence encoder.*text_encoder: frozen"),
        ({"item_repr": "id", "text_model_name_or_path": DEFAULT_PRETRAINED},
         "embeds item text, but item_repr='id' has none"),
        ({"item_text_max_tokens": 600}, "item_text_max_tokens=600 exceeds the 512 positions"),
    ],
)
def test_bad_anchor_settings_are_refused_when_the_config_is_built(text_root, tmp_path, overrides, fragment):
    with pytest.raises(RecboleLLMError, match=fragment):
        Config(model="BERTRec", dataset="ml-text", config_dict=text_config(text_root, tmp_path, **overrides))


def test_a_text_model_that_cannot_embed_text_is_refused_when_the_config_is_built(text_root, tmp_path):
    """Folders transformers would load with a 5-token tokenizer, no weights, too few positions, or a vocabulary
    smaller than the tokenizer's; an encoder-decoder: one line each, naming the key, before any data is read."""
    from transformers import AutoTokenizer, BertConfig, BertModel, T5Config

    from recbole_llm.model.backbone import resolve_pretrained

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(DEFAULT_PRETRAINED))

    def folder(name: str, weights: bool = True, tokens: bool = True, **sizes):
        path = tmp_path / name
        config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, **sizes)
        BertModel(config).save_pretrained(path) if weights else config.save_pretrained(path)
        if tokens:
            tokenizer.save_pretrained(path)
        return str(path)

    T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32).save_pretrained(tmp_path / "t5")
    cases = [
        (folder("no-tokenizer", tokens=False), "has no tokenizer (tokenizer.json or vocab.txt"),
        (folder("no-weights", weights=False), "has no weights (model.safetensors"),
        (folder("few-positions", max_position_embeddings=8), "item_text_max_tokens=16 exceeds the 8 positions of "
                                                             "text_model_name_or_path"),
        (folder("small-vocab", vocab_size=100), "its tokenizer has 30522 tokens, its embedding table 100"),
        (str(tmp_path / "t5"), "is a t5 model, not a text encoder"),
    ]
    for path, fragment in cases:
        with pytest.raises(RecboleLLMError, match="text_model_name_or_path") as refused:
            Config(model="BERTRec", dataset="ml-text", config_dict=text_config(
                text_root, tmp_path, text_model_name_or_path=path, item_repr="id+text"))
        assert fragment in str(refused.value) and "\n" not in str(refused.value), (path, str(refused.value))


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"item_text_fields": ["no_such_field"]}, "item text field 'no_such_field' is not a loaded item feature"),
        ({"item_text_fields": ["timestamp"]}, "item text field 'timestamp' is not a loaded item feature"),
        ({"load_col": {"inter": ["user_id", "item_id", "timestamp"]}}, "need an item file"),
        ({"item_repr": "image"}, "item_repr='image' is not supported"),
    ],
)
def test_bad_text_settings(text_root, tmp_path, overrides, fragment):
    with pytest.raises(RecboleLLMError, match=fragment):
        build(text_config(text_root, tmp_path, **overrides))


def metric_config(**overrides) -> dict:
    return {"topk": [1, 2], "metric_decimal_place": 4, "tail_threshold": 1, **overrides}


def struct(hits: list[list[int]], positives: list[int], counts: dict[int, int]) -> DataStruct:
    data = DataStruct()
    topk = torch.tensor([row + [1] for row in hits])  # the hit flags of the top-2, then pos_len = 1
    data.update_tensor("rec.topk", topk)
    data.update_tensor("rec.positive_items", torch.tensor(positives))
    data.set("data.count_items", Counter(counts))
    return data


def test_f1_equals_the_hand_computed_value():
    # users: hit at rank 1; hit at rank 2; no hit. One relevant item each.
    data = struct([[1, 0], [0, 1], [0, 0]], [5, 6, 7], {})
    result = F1(metric_config()).calculate_metric(data)
    # @1: F1 per user = 2*1*1/(1+1)=1, 0, 0 -> 1/3
    # @2: user 1: P=1/2, R=1 -> 2/3; user 2: the same 2/3; user 3: 0 -> (4/3)/3 = 0.4444
    assert result == {"f1@1": 0.3333, "f1@2": 0.4444}


def test_tail_metrics_equal_the_hand_computed_values():
    # targets 5 (1 training interaction: tail), 6 (9: head), 7 (never seen: tail), threshold 1
    data = struct([[0, 1], [1, 0], [1, 0]], [5, 6, 7], {5: 1, 6: 9})
    ndcg = TailNDCG(metric_config()).calculate_metric(data)
    recall = TailRecall(metric_config()).calculate_metric(data)
    # tail users: user 1 (hit at rank 2: NDCG 1/log2(3) = 0.6309) and user 3 (hit at rank 1: 1)
    assert ndcg == {"tailndcg@1": 0.5, "tailndcg@2": round((1 / np.log2(3) + 1) / 2, 4)}
    assert recall == {"tailrecall@1": 0.5, "tailrecall@2": 1.0}


@pytest.mark.slow
def test_text_mode_model_exports_with_its_item_table_baked_in(text_root, tmp_path):
    """A text model exports with its item table baked in; one saved before text_model_name_or_path existed (the
    coupled layout: item text through the sequence encoder's own pretrained model) still loads, evaluates and
    exports its text tower (validated against PyTorch on every item's text)."""
    import json

    from recbole.quick_start import load_data_and_model, run_recbole

    from recbole_llm.checkpoint.format import atomic_save, load
    from recbole_llm.export import ExportOptions, export_checkpoint

    run_recbole(model="BERTLoRA", dataset="ml-text", config_dict=text_config(
        text_root, tmp_path, item_repr="id+text", epochs=1, train_batch_size=512))
    checkpoint = best_checkpoint(tmp_path / "saved")
    artifact = export_checkpoint(checkpoint, tmp_path / "artifact", ExportOptions(top_k=10)).path
    metadata = json.loads((artifact / "metadata.json").read_text())
    assert metadata["item_repr"] == "id+text" and metadata["validation"][0]["passed"]
    assert NEW_ITEM in metadata["item_tokens"]  # the cold-start item is servable

    state = load(checkpoint)
    del state["config"].final_config_dict["text_model_name_or_path"]
    old = tmp_path / "coupled.pth"
    atomic_save(state, old)
    results = []
    for path in (checkpoint, old):  # the same model either way: the same test metrics
        config, model, _, train_data, _, test_data = load_data_and_model(str(path))
        assert model.text_model_name_or_path == config["pretrained_model_name_or_path"]
        assert model.text_projection.weight.shape == (384, 384)
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        trainer.eval_collector.data_collect(train_data)  # the tail metrics' item counts, as fit collects them
        results.append(trainer.evaluate(test_data, load_best_model=False, show_progress=False))
    assert results[0] == results[1] and results[0]["recall@10"] > 0
    index = export_checkpoint(old, tmp_path / "coupled", ExportOptions(item_index=True)).path
    metadata = json.loads((index / "metadata.json").read_text())
    assert metadata["text_tower"]["text_model"] == DEFAULT_PRETRAINED  # the coupled layout: the encoder's own
    assert all(report["passed"] for report in metadata["validation"])


@pytest.mark.slow
def test_frozen_text_comes_from_the_whole_pretrained_encoder(text_root, tmp_path):
    """backbone_layers cuts the sequence encoder only: item text is embedded by every pretrained layer, so a
    1-layer and a 2-layer model see the same item text vectors, and the cut encoder's would differ."""
    from recbole_llm.model.item_text import text_vectors
    from recbole_llm.model.item_text import mean_pool

    one = build(text_config(text_root, tmp_path, backbone_layers=1))[2]
    two = build(text_config(text_root, tmp_path, backbone_layers=2))[2]
    assert len(one.encoder.encoder.layer) == 1 and len(two.encoder.encoder.layer) == 2
    assert torch.equal(one.text_embeddings, two.text_embeddings)
    assert torch.allclose(one.text_embeddings.norm(dim=-1)[1:-1], torch.ones(one.n_items - 2), atol=1e-5)
    with torch.no_grad():
        cut = one.encoder(input_ids=one.text_input_ids, attention_mask=one.text_attention_mask).last_hidden_state
    cut = mean_pool(cut, one.text_attention_mask)
    cut_vectors = text_vectors(cut, cut[1:].mean(dim=0))
    cosine = (cut_vectors[1:] * one.text_embeddings[1:]).sum(-1)
    assert cosine.mean() < 0.9, cosine.mean()  # the first layer alone embeds text differently

    # decoupled widths: a 16-wide random sequence encoder takes the same 384-wide text vectors, projected; the
    # projection starts from their principal directions (orthogonal rows), at the norm ID embeddings start with
    small = build(text_config(text_root, tmp_path, pretrained_model_name_or_path=None, n_layers=1, n_heads=2,
                              hidden_size=16, inner_size=32, text_model_name_or_path=DEFAULT_PRETRAINED))[2]
    assert small.encoder.config.hidden_size == 16 and small.text_projection.weight.shape == (16, 384)
    assert torch.equal(small.text_embeddings, one.text_embeddings)
    weight = small.text_projection.weight.detach()
    gram = weight @ weight.T
    assert torch.allclose(gram, gram.diagonal().diag(), atol=1e-6 * gram.max())  # orthogonal directions
    vectors = small.text_embeddings[1:][small.item_has_text[1:]]
    scale = small.initializer_range * 16**0.5
    assert torch.isclose((vectors @ weight.T).norm(dim=-1).pow(2).mean().sqrt(), torch.tensor(scale), rtol=1e-4)
    centred = vectors - vectors.mean(dim=0)  # the first direction carries the most variance
    variances = (centred @ (weight / weight.norm(dim=-1, keepdim=True)).T).var(dim=0)
    assert (variances[:-1] >= variances[1:] - 1e-7).all() and variances[0] > 2 * variances[-1]
    assert small.item_table().shape == (small.n_items, 16)
