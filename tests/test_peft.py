"""Parameter-efficient fine-tuning: LoRA, AdaLoRA, bottleneck Adapters and peft methods by configuration."""

from __future__ import annotations

import os
import re

import pytest
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.quick_start import load_data_and_model
from recbole.trainer import Trainer
from recbole.utils import get_model, get_trainer, init_seed

from conftest import LEARNING_DATASET, bundled
from recbole_llm import RecboleLLMError, load_checkpoint
from recbole_llm.training.trainer import PluginTrainer

PEFT_VARIANTS = {
    "BERTLoRA": {},
    "BERTAdaLoRA": {},
    "BERTAdapter": {"adapter_size": 16},
    # any other peft method, by configuration only
    "BERTPEFT": {"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
}


def build(model_name: str, config_dict: dict, dataset: str = "ml-slice", config_file_list: list | None = None):
    config = Config(model=model_name, dataset=dataset, config_dict=config_dict, config_file_list=config_file_list)
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


@pytest.mark.slow
@pytest.mark.parametrize("model_name", list(PEFT_VARIANTS))
def test_backbone_stays_frozen_adapters_learn_beyond_popularity(model_name, tiny_bert, pop_ndcg):
    # every position of each window of 20 trained: on ml-100k, a few seconds an epoch for the tiny encoder
    settings = bundled({**tiny_bert, **PEFT_VARIANTS[model_name], "epochs": 5, "learning_rate": 0.002,
                        "train_positions": "all", "train_batch_size": 16})
    config, model, train_data, valid_data, test_data = build(model_name, settings, dataset=LEARNING_DATASET)
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


@pytest.mark.slow
def test_lora_on_the_pretrained_encoder_trains_under_two_percent(base_config):
    _, model, _, _, _ = build("BERTLoRA", {**base_config, "r": 8})
    adapter = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    encoder = sum(p.numel() for p in model.encoder.parameters())
    assert adapter / encoder <= 0.02, (adapter, encoder)
    trainable, total, _ = model.parameter_counts()
    # what RecBole logs at start (colours aside): the plugin's one-line-per-part summary, not the module tree
    summary = re.sub(r"\x1b\[[0-9;]*m", "", str(model))
    assert summary.startswith("BERTLoRA: ") and f"Trainable parameters: {trainable} of {total}" in summary


def checkpoint_of(model_name: str, config_dict: dict, tmp_path) -> tuple[str, object]:
    config, model, *_ = build(model_name, {**config_dict, "checkpoint_dir": str(tmp_path / model_name)})
    trainer = get_trainer(config["MODEL_TYPE"], model_name)(config, model)
    trainer._save_checkpoint(0, verbose=False)
    return trainer.saved_model_file, model


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_lora_merges_with_the_same_scores(tiny_bert):
    model, batch = trained_a_little("BERTLoRA", tiny_bert)
    with torch.no_grad():
        before = model.full_sort_predict(batch)
        assert model.merge_adapters()
        after = model.full_sort_predict(batch)
    assert not any("lora" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_bottleneck_adapters_stay_as_modules(tiny_bert):
    model, batch = trained_a_little("BERTAdapter", {**tiny_bert, "adapter_size": 8})
    with torch.no_grad():
        before = model.full_sort_predict(batch)
        assert model.merge_adapters() is False
        assert torch.equal(model.full_sort_predict(batch), before)


@pytest.mark.slow
def test_adapter_saves_in_peft_format(tiny_bert, tmp_path):
    import json

    model, _ = trained_a_little("BERTLoRA", tiny_bert)
    model.save_adapter(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 8
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
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


SAMPLINGS = {
    "CE, no sampling": {"loss_type": "CE", "train_neg_sample_args": None},
    "BPR, uniform x1": {"loss_type": "BPR", "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}},
    "BPR, uniform x3": {"loss_type": "BPR", "train_neg_sample_args": {"distribution": "uniform", "sample_num": 3}},
    "BPR, popularity x2": {"loss_type": "BPR",
                           "train_neg_sample_args": {"distribution": "popularity", "sample_num": 2}},
}


@pytest.mark.slow
@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_adalora_schedule_spans_the_steps_the_trainer_takes(tiny_bert, sampling):
    """total_step is the optimizer steps PluginTrainer really takes: RecBole's TrainDataLoader makes more,
    smaller batches when it samples several negatives per positive."""
    from peft.tuners.adalora import SVDLinear

    settings = {**tiny_bert, **SAMPLINGS[sampling], "epochs": 2, "deltaT": 1, "train_batch_size": 512}
    config, model, train_data, _, _ = build("BERTAdaLoRA", settings, dataset="ml-tiny")
    schedule = model.encoder.peft_config["default"]
    planned = schedule.total_step
    trainer = get_trainer(config["MODEL_TYPE"], "BERTAdaLoRA")(config, model)
    trainer.fit(train_data, None, saved=False, show_progress=False)

    assert trainer.global_step == 2 * len(train_data)
    assert planned == trainer.global_step, (sampling, planned, trainer.global_step)
    assert 0 < schedule.tinit < schedule.total_step - schedule.tfinal < schedule.total_step
    assert (schedule.tinit, schedule.tfinal) == (int(0.1 * planned), int(0.2 * planned))  # the YAML's ratios
    # the budget was fixed at total_step - tfinal, inside the run: every matrix ended at target_r on average
    adapted = sum(1 for module in model.encoder.modules() if isinstance(module, SVDLinear))
    assert model.rank_budget() == schedule.target_r * adapted


@pytest.mark.parametrize("override, fragment", [
    ({"total_step": 5}, "total_step=5 does not match the 16 optimizer steps of this run"),
    ({"tinit": 10, "tfinal": 6}, "tinit=10 and tfinal=6 leave no steps to reallocate ranks in"),
    ({"tinit_ratio": 0.6, "tfinal_ratio": 0.5}, "tinit_ratio=0.6 and tfinal_ratio=0.5 leave no steps"),
    ({"tinit": "soon"}, "tinit='soon' must be an integer of at least 0: .*, or remove it"),
])
def test_adalora_refuses_a_schedule_other_than_the_runs(tiny_bert, override, fragment):
    settings = {**tiny_bert, "epochs": 1, "train_batch_size": 512, **override}
    with pytest.raises(RecboleLLMError, match=fragment) as error:
        build("BERTAdaLoRA", settings, dataset="ml-tiny")
    assert "\n" not in str(error.value)


def adapted_module_names(model) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for name, module in model.encoder.named_modules() if isinstance(module, BaseTunerLayer)}


@pytest.mark.slow
@pytest.mark.parametrize("model_name, extra", [
    ("BERTLoRA", {}), ("BERTAdaLoRA", {"epochs": 1}), ("BERTPEFT", {"peft_type": "LOHA"}),
])
@pytest.mark.parametrize("source", ["command line", "config_dict", "yaml"])
def test_target_modules_as_a_bare_name_means_that_module(tiny_bert, tmp_path, monkeypatch, model_name, extra,
                                                           source):
    settings, files = {**tiny_bert, **extra, "n_layers": 2}, None
    if source == "command line":
        monkeypatch.setattr("sys.argv", ["recbole-llm", "--target_modules=query"])
    elif source == "config_dict":
        settings["target_modules"] = "query"
    else:
        (tmp_path / "user.yaml").write_text("target_modules: query\n")
        files = [str(tmp_path / "user.yaml")]
    _, model, *_ = build(model_name, settings, dataset="ml-tiny", config_file_list=files)
    adapted = adapted_module_names(model)
    assert len(adapted) == 2 and all(name.endswith(".attention.self.query") for name in adapted), adapted


@pytest.mark.parametrize("target_modules, adapted_leaves", [
    ("query, value", {"query", "value"}),  # --target_modules=query,value
    ("[query,value]", {"query", "value"}),  # --target_modules=[query,value], as in YAML
    (r".*\.self\.(key|value)", {"key", "value"}),  # anything else stays peft's regex full match
])
def test_target_modules_strings_name_lists_or_stay_regexes(tiny_bert, target_modules, adapted_leaves):
    _, model, *_ = build("BERTLoRA", {**tiny_bert, "target_modules": target_modules}, dataset="ml-tiny")
    assert {name.rsplit(".", 1)[-1] for name in adapted_module_names(model)} == adapted_leaves


def test_target_modules_that_match_nothing_list_the_encoders_modules(tiny_bert):
    with pytest.raises(RecboleLLMError) as error:
        build("BERTLoRA", {**tiny_bert, "target_modules": "querry"}, dataset="ml-tiny")
    message = str(error.value)
    assert "target_modules ['querry'] match no module of the encoder" in message and "\n" not in message
    encoder = build("BERTRec", tiny_bert, dataset="ml-tiny")[1].encoder
    existing = {name.rsplit(".", 1)[-1] for name, module in encoder.named_modules()
                if name and any(True for _ in module.parameters(recurse=False))}
    assert {"query", "key", "value", "dense", "LayerNorm", "word_embeddings"} <= existing
    listed = message.split("its modules are ", 1)[1]
    assert all(name in listed for name in existing), (existing, message)


def test_target_modules_the_method_cannot_adapt_say_so(tiny_bert):
    with pytest.raises(RecboleLLMError) as error:
        build("BERTLoRA", {**tiny_bert, "target_modules": ["LayerNorm"]}, dataset="ml-tiny")
    message = str(error.value)
    assert "LORA cannot adapt target_modules ['LayerNorm']" in message and "match no module" not in message
    assert "dense, key, query, value" in message and "\n" not in message  # the encoder's linear layers


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_name, override, fragment",
    [
        ("BERTPEFT", {"peft_type": "NOPE"}, "peft_type='NOPE' is not supported"),
        ("BERTPEFT", {"peft_type": "PROMPT_TUNING"}, "prompt-learning method"),
        ("BERTLoRA", {"target_modules": ["no_such_module"]}, "match no module of the encoder"),
        ("BERTLoRA", {"r": 0}, "r=0 must be a positive integer"),
        ("BERTAdapter", {"adapter_size": 0}, "adapter_size=0 must be a positive integer"),
        ("BERTAdaLoRA", {"epochs": 0}, "epochs=0 must be a positive integer"),  # Config refuses it first
    ],
)
def test_bad_peft_settings_fail_at_construction(tiny_bert, model_name, override, fragment):
    with pytest.raises(RecboleLLMError, match=fragment) as error:
        build(model_name, {**tiny_bert, **override})
    assert "\n" not in str(error.value)


@pytest.mark.slow
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
