"""``repeatable: False`` for sequential models (recbole_llm.patches.seen_items): full-ranking evaluation masks
every item the user had before the row's target, also the ones older than MAX_ITEM_LIST_LENGTH, never the
target itself; RecBole's default (``repeatable: True``) masks nothing, as before.

The expected histories come from the atomic file itself (each user's rows in time order, file order among
equal times, as RecBole's stable sort leaves them), not from the code under test.
"""

from __future__ import annotations


import pytest
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model, get_trainer, init_seed

from conftest import histories_from_file, write_pre_split

WINDOW = 5  # far shorter than the slice's histories: most masked items are outside the row's item list


def prepared(model: str, settings: dict):
    config = Config(model=model, dataset="ml-tiny", config_dict=settings)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    return config, dataset, data_preparation(config, dataset)


def masked_by_row(loader) -> list[tuple[str, str, set[str]]]:
    """(user token, target token, masked item tokens) for every row the loader yields."""
    dataset = loader._dataset
    found = []
    for interaction, history, _, _ in loader:
        rows, items = history
        for row in range(len(interaction)):
            masked = {dataset.id2token(dataset.iid_field, int(i)) for i in items[rows == row]}
            found.append((dataset.id2token(dataset.uid_field, int(interaction[dataset.uid_field][row])),
                          dataset.id2token(dataset.iid_field, int(interaction[dataset.iid_field][row])), masked))
    return found


@pytest.mark.parametrize("model", ["SASRec", "BERTRec"])
def test_not_repeatable_masks_every_earlier_item_of_the_user_and_never_the_target(model, tiny_bert, data_root):
    settings = {**tiny_bert, "MAX_ITEM_LIST_LENGTH": WINDOW, "repeatable": False}
    if model == "BERTRec":  # the plugin's training windows: rows of the training split are cut, not the history
        settings["train_positions"] = "all"
    config, _, (_, valid, test) = prepared(model, settings)
    assert config["repeatable"] is False
    histories = histories_from_file(data_root, "ml-tiny")
    longer = 0
    for loader, back in ((valid, 2), (test, 1)):
        rows = masked_by_row(loader)
        assert len(rows) == len(histories)
        for user, target, masked in rows:
            items = histories[user]
            assert target == items[-back]
            assert masked == set(items[:-back]) - {target}, user
            longer += len(items) - back > WINDOW
    assert longer > len(histories)  # most rows' histories reach past the item list


def test_repeatable_by_default_masks_nothing_and_masking_only_raises_ranking_metrics(tiny_bert):
    settings = {**tiny_bert, "MAX_ITEM_LIST_LENGTH": WINDOW}
    config, dataset, (train, _, test) = prepared("BERTRec", settings)
    assert config["repeatable"] is True
    _, history, _, _ = next(iter(test))
    assert history is None

    masked_config, _, (_, _, masked_test) = prepared("BERTRec", {**settings, "repeatable": False})
    init_seed(2020, True)
    model = get_model("BERTRec")(config, train._dataset)
    results = {}
    for name, (cfg, loader) in {"all": (config, test), "unseen": (masked_config, masked_test)}.items():
        trainer = get_trainer(cfg["MODEL_TYPE"], "BERTRec")(cfg, model)
        results[name] = trainer.evaluate(loader, load_best_model=False, show_progress=False)
        batch = next(iter(loader))
        _, scores, _, _ = trainer._full_sort_batch_eval(batch)
        if name == "unseen":  # RecBole's own masking, with the plugin's index: no seen item in any top 10
            rows, items = batch[1]
            assert torch.isinf(scores[rows, items]).all()
            top = scores.topk(10).indices
            seen = torch.zeros_like(scores, dtype=torch.bool)
            seen[rows, items] = True
            assert not seen.gather(1, top).any()
    # masking items that are never the target can only move the target up
    assert results["unseen"]["ndcg@10"] >= results["all"]["ndcg@10"]
    assert results["unseen"]["recall@10"] >= results["all"]["recall@10"]


def test_not_repeatable_keeps_recboles_sequential_sampler_for_negatives(tiny_bert):
    """Only full ranking's mask changes: BPR's training negatives and uni100's evaluation negatives still come
    from RecBole's sequential sampler, not from one that leaves out every item of the user's split."""
    from recbole.sampler import RepeatableSampler

    settings = {**tiny_bert, "MAX_ITEM_LIST_LENGTH": WINDOW, "repeatable": False, "loss_type": "BPR",
                "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1},
                "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "uni100"}}
    config, _, loaders = prepared("SASRec", settings)
    assert config["repeatable"] is False
    assert all(type(loader._sampler) is RepeatableSampler for loader in loaders)


def test_not_repeatable_on_pre_split_data_masks_each_rows_own_item_list(tiny_bert, data_root, tmp_path):
    """Pre-split data (``benchmark_filename``) is not augmented, so RecBole keeps no whole history: each row's
    own item list is what it was given and what is masked, never the row's target."""
    histories = histories_from_file(data_root, "ml-tiny")
    folder = tmp_path / "split" / "ml-split"
    parts = write_pre_split(folder.parent, "ml-split", histories, train_prefixes=True)
    settings = {**tiny_bert, "data_path": str(folder.parent), "benchmark_filename": ["train", "valid", "test"],
                "load_col": {"inter": ["user_id", "item_id_list", "item_id"]}, "alias_of_item_id": ["item_id_list"],
                "repeatable": False}
    config = Config(model="BERTRec", dataset="ml-split", config_dict=settings)
    init_seed(config["seed"], config["reproducibility"])
    _, valid, test = data_preparation(config, create_dataset(config))
    for loader, part in ((valid, "valid"), (test, "test")):
        expected = {user: (target, set(history) - {target}) for user, history, target in parts[part]}
        rows = masked_by_row(loader)
        assert len(rows) == len(expected)
        for user, target, masked in rows:
            assert (target, masked) == expected[user], user
