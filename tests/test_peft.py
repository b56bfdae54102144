"""Parameter-efficient fine-tuning: LoRA, AdaLoRA, bottleneck Adapters and peft methods by configuration."""

from __future__ import annotations

import os

import pytest
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.quick_start import load_data_and_model
from recbole.trainer import Trainer
from recbole.utils import get_model, get_trainer, init_seed

from recbole_llm import RecboleLLMError, load_checkpoint
from recbole_llm.trainer import PluginTrainer

PEFT_VARIANTS = {
    "BERTLoRA": {},
    "BERTAdaLoRA": {},
    "BERTAdapter": {"adapter_size": 16},
    # any other peft method, by configuration only
    "BERTPEFT": {"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
}


def build(model_name: str, config_dict: dict):
    config = Config(model=model_name, dataset="ml-slice", config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(model_name)(config, train_data._dataset)
    return config, model, train_data, valid_data, test_data


def frozen_and_trainable(model):
    frozen = {n: p.detach().clone() for n, p in model.encoder.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.encoder.named_parameters() if p.requires_grad}
    return frozen, adapters


@pytest.mark.parametrize("model_name", list(PEFT_VARIANTS))
def test_backbone_stays_frozen_adapters_learn_beyond_popularity(model_name, tiny_bert, pop_ndcg):
    settings = {**tiny_bert, **PEFT_VARIANTS[model_name], "epochs": 6, "learning_rate": 0.005}
    config, model, train_data, valid_data, test_data = build(model_name, settings)
    frozen_before, adapters_before = frozen_and_trainable(model)
    assert frozen_before and adapters_before
    budget_before = model.rank_budget() if model_name == "BERTAdaLoRA" else None

    trainer = get_trainer(config["MODEL_TYPE"], model_name)(config, model)
    assert isinstance(trainer, PluginTrainer)
    trainer.fit(train_data, valid_data, show_progress=False)
    # after training, not after reloading the best checkpoint: what the optimizer did to the weights
    frozen_after, adapters_after = frozen_and_trainable(model)
    for name, before in frozen_before.items():
        assert torch.equal(before, frozen_after[name]), f"frozen weight {name} changed"
    assert any(not torch.equal(before, adapters_after[n]) for n, before in adapters_before.items())
    if model_name == "BERTAdaLoRA":
        assert model.rank_budget() < budget_before  # the budget shrank towards target_r

    result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    print(f"\n{model_name}: test NDCG@10 {result['ndcg@10']:.4f} vs Pop {pop_ndcg:.4f}")
    assert result["ndcg@10"] > pop_ndcg, (result, pop_ndcg)


def test_lora_on_the_pretrained_encoder_trains_under_two_percent(base_config):
    _, model, _, _, _ = build("BERTLoRA", {**base_config, "r": 8})
    adapter = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    encoder = sum(p.numel() for p in model.encoder.parameters())
    assert adapter / encoder <= 0.02, (adapter, encoder)
    trainable, total, _ = model.parameter_counts()
    assert f"Trainable parameters: {trainable} of {total}" in str(model)  # what RecBole logs at start


def checkpoint_of(model_name: str, config_dict: dict, tmp_path) -> tuple[str, object]:
    config, model, *_ = build(model_name, {**config_dict, "checkpoint_dir": str(tmp_path / model_name)})
    trainer = get_trainer(config["MODEL_TYPE"], model_name)(config, model)
    trainer._save_checkpoint(0, verbose=False)
    return trainer.saved_model_file, model


def test_lora_checkpoint_is_a_tenth_of_bertrec_and_reloads_identically(base_config, tmp_path):
    bertrec_file, _ = checkpoint_of("BERTRec", base_config, tmp_path)
    lora_file, lora = checkpoint_of("BERTLoRA", {**base_config, "backbone_layers": None}, tmp_path)
    ratio = os.path.getsize(lora_file) / os.path.getsize(bertrec_file)
    assert ratio <= 0.10, ratio

    _, reloaded, _, _, _, test_data = load_data_and_model(lora_file)
    batch = next(iter(test_data))[0]
    lora.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(lora.full_sort_predict(batch), reloaded.full_sort_predict(batch))


def test_mismatched_backbone_is_refused(tiny_bert, tmp_path):
    lora_file, _ = checkpoint_of("BERTLoRA", tiny_bert, tmp_path)
    state = load_checkpoint(lora_file)["state_dict"]
    _, other, *_ = build("BERTLoRA", {**tiny_bert, "seed": 7})  # same shapes, other weights
    with pytest.raises(RecboleLLMError, match="different backbone"):
        other.load_state_dict(state)


def trained_a_little(model_name: str, config_dict: dict):
    config, model, train_data, _, test_data = build(model_name, {**config_dict, "learning_rate": 0.01})
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _, batch in zip(range(5), train_data):
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()
    model.eval()
    return model, next(iter(test_data))[0]


def test_lora_merges_with_the_same_scores(tiny_bert):
    model, batch = trained_a_little("BERTLoRA", tiny_bert)
    with torch.no_grad():
        before = model.full_sort_predict(batch)
        assert model.merge_adapters()
        after = model.full_sort_predict(batch)
    assert not any("lora" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_bottleneck_adapters_stay_as_modules(tiny_bert):
    model, batch = trained_a_little("BERTAdapter", {**tiny_bert, "adapter_size": 8})
    with torch.no_grad():
        before = model.full_sort_predict(batch)
        assert model.merge_adapters() is False
        assert torch.equal(model.full_sort_predict(batch), before)


def test_adapter_saves_in_peft_format(tiny_bert, tmp_path):
    import json

    model, _ = trained_a_little("BERTLoRA", tiny_bert)
    model.save_adapter(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 8
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_adalora_adds_its_orthogonal_regulariser(tiny_bert):
    config, model, train_data, _, _ = build("BERTAdaLoRA", {**tiny_bert, "epochs": 2})
    batch = next(iter(train_data))
    model.train()
    torch.manual_seed(0)
    with_regulariser = model.calculate_loss(batch)
    model.encoder.peft_config["default"].orth_reg_weight = 0.0
    torch.manual_seed(0)
    without = model.calculate_loss(batch)
    assert with_regulariser.item() > without.item()
    expected_steps = 2 * len(train_data)
    assert model.encoder.peft_config["default"].total_step == expected_steps


@pytest.mark.parametrize(
    "model_name, override, fragment",
    [
        ("BERTPEFT", {"peft_type": "NOPE"}, "unknown peft_type 'NOPE'"),
        ("BERTPEFT", {"peft_type": "PROMPT_TUNING"}, "prompt-learning method"),
        ("BERTLoRA", {"target_modules": ["no_such_module"]}, "match nothing in the encoder"),
        ("BERTLoRA", {"r": 0}, "r=0 must be a positive rank"),
        ("BERTAdapter", {"adapter_size": 0}, "adapter_size=0 must be a positive integer"),
        ("BERTAdaLoRA", {"epochs": 0}, "AdaLoRA needs training steps"),
    ],
)
def test_bad_peft_settings_fail_at_construction(tiny_bert, model_name, override, fragment):
    with pytest.raises(RecboleLLMError, match=fragment) as error:
        build(model_name, {**tiny_bert, **override})
    assert "\n" not in str(error.value)


def test_trainer_warmup_schedule_and_fgm(tiny_bert):
    config, model, train_data, valid_data, _ = build(
        "BERTLoRA",
        {**tiny_bert, "epochs": 2, "lr_scheduler": "cosine", "warmup_ratio": 0.5, "adversarial": "fgm"},
    )
    trainer = get_trainer(config["MODEL_TYPE"], "BERTLoRA")(config, model)
    trainer.fit(train_data, valid_data, show_progress=False, saved=False)
    total = 2 * len(train_data)
    assert trainer.global_step == total
    # cosine decay ends at zero; half-way (end of warmup) it peaked at the configured rate
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)
    losses = [trainer.train_loss_dict[e] for e in sorted(trainer.train_loss_dict)]
    assert losses[-1] < losses[0]


def test_recbole_models_keep_recboles_trainer():
    from recbole.utils import ModelType

    trainer = get_trainer(ModelType.SEQUENTIAL, "SASRec")
    assert trainer is Trainer and not issubclass(trainer, PluginTrainer)
