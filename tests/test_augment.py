"""Sequence augmentation (augmentation: [crop, mask, reorder]): training batches change, reproducibly under the
seed, the most recent item stays, evaluation is untouched, and bad settings are one-line errors."""

from __future__ import annotations

import pytest
import torch

from recbole_llm import RecboleLLMError


def build(tiny_bert: dict, **settings):
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    config = Config(model="BERTRec", dataset="ml-tiny", config_dict={**tiny_bert, "epochs": 1, **settings})
    init_seed(config["seed"], config["reproducibility"])
    train, valid, test = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    model = get_model("BERTRec")(config, train._dataset)
    return get_trainer(config["MODEL_TYPE"], "BERTRec")(config, model), train, test


def augmented_batches(trainer, batches, epoch: int):
    trainer.augmenter.start_epoch(epoch)
    return [(batch, trainer.augmenter(batch)) for batch in batches]


@pytest.mark.slow
def test_augmentation_changes_training_batches_reproducibly_and_keeps_the_last_item(tiny_bert):
    trainer, train, _ = build(tiny_bert, augmentation=["crop", "mask", "reorder"], augmentation_prob=1.0)
    seq_field, len_field = trainer.model.ITEM_SEQ, trainer.model.ITEM_SEQ_LEN
    batches = [batch for batch, _ in zip(train, range(3))]
    runs = [augmented_batches(trainer, batches, epoch=3), augmented_batches(trainer, batches, epoch=3)]
    changed = 0
    for (batch, one), (_, two) in zip(*runs):
        assert torch.equal(one[seq_field], two[seq_field]) and torch.equal(one[len_field], two[len_field])
        assert torch.equal(one[trainer.model.POS_ITEM_ID], batch[trainer.model.POS_ITEM_ID])  # targets untouched
        rows = torch.arange(len(batch))
        # the most recent item of every history is still the last one the model reads
        assert torch.equal(one[seq_field][rows, one[len_field] - 1], batch[seq_field][rows, batch[len_field] - 1])
        changed += int((one[seq_field] != batch[seq_field]).any(dim=1).sum())
    assert changed > 0
    other = augmented_batches(trainer, batches, epoch=4)
    assert any(not torch.equal(a[1][seq_field], b[1][seq_field]) for a, b in zip(runs[0], other))


@pytest.mark.slow
def test_evaluation_is_untouched_and_training_uses_it(tiny_bert):
    plain, train, test = build(tiny_bert)
    augmented, _, _ = build(tiny_bert, augmentation=["mask"], augmentation_prob=1.0)
    assert not plain.augmenter.active and augmented.augmenter.active
    # same initial weights: evaluation gives the same result whether augmentation is configured or not
    before = plain.evaluate(test, load_best_model=False, show_progress=False)
    assert augmented.evaluate(test, load_best_model=False, show_progress=False) == before
    counting = Counting(augmented.augmenter)
    augmented.augmenter = counting
    augmented._train_epoch(train, 0)
    assert counting.calls, "training batches go through the augmenter"
    counting.calls = 0
    augmented.evaluate(test, load_best_model=False, show_progress=False)
    assert counting.calls == 0, "evaluation batches must not be augmented"


class Counting:
    """The trainer's augmenter, counting the batches it is handed."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    @property
    def active(self) -> bool:
        return self.inner.active

    def start_epoch(self, epoch: int) -> None:
        self.inner.start_epoch(epoch)

    def __call__(self, interaction):
        self.calls += 1
        return self.inner(interaction)


@pytest.mark.parametrize("settings, words", [
    ({"augmentation": ["shuffle"]}, "augmentation='shuffle' is not supported; use crop, mask or reorder"),
    ({"augmentation": 3}, "augmentation=3 must be a list of names: e.g. augmentation: [crop, mask, reorder]"),
    ({"augmentation": ["crop"], "crop_ratio": 0}, "crop_ratio=0 must be a number in (0, 1]"),
    ({"augmentation": ["mask"], "augmentation_prob": 1.5}, "augmentation_prob=1.5 must be a number in [0, 1]"),
])
def test_bad_augmentation_settings_are_one_line_errors(tiny_bert, settings, words):
    with pytest.raises(RecboleLLMError) as raised:
        build(tiny_bert, **settings)
    assert words in str(raised.value) and "\n" not in str(raised.value)
