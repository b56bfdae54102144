"""The declared model contract: every registered plugin model is a PluginModel, scores the same through
export_scores as through RecBole's full_sort_predict, and refuses a bad value of each key it reads in one
line naming that key."""

from __future__ import annotations

import inspect

import pytest
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model, init_seed

from recbole_llm import RecboleLLMError
from recbole_llm.model import bertrec
from recbole_llm.model.contract import Exportable, PluginModel
from recbole_llm.model.catalog import PLUGIN_MODELS, get_plugin_model

# A random encoder small enough that building every model takes well under a second.
TINY_ENCODER = {
    "pretrained_model_name_or_path": None,
    "n_layers": 1,
    "n_heads": 2,
    "hidden_size": 32,
    "inner_size": 64,
    "MAX_ITEM_LIST_LENGTH": 10,
    "epochs": 1,
    "train_batch_size": 512,
    "show_progress": False,
}
EXTRA = {"BERTAdapter": {"adapter_size": 8}, "BERTPEFT": {"peft_type": "LOHA", "r": 2}}


@pytest.fixture(scope="module")
def settings(data_root, tmp_path_factory):
    """Base config for ml-tiny, and a cwd and sys.argv that RecBole cannot trip over (module-scoped
    fixtures run before conftest's per-test ones)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("contract"))
        patch.setattr("sys.argv", ["pytest"])
        yield {"data_path": str(data_root), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
               "seed": 2020, **TINY_ENCODER}


@pytest.fixture(scope="module")
def built(settings) -> dict:
    """Every registered plugin model on ml-tiny, in eval mode, with one full-ranking test batch."""
    models = {}
    for name in PLUGIN_MODELS:
        config = Config(model=name, dataset="ml-tiny", config_dict={**settings, **EXTRA.get(name, {})})
        init_seed(config["seed"], config["reproducibility"])
        train_data, _, test_data = data_preparation(config, create_dataset(config))
        model = get_model(name)(config, train_data._dataset).eval()
        models[name] = (model, next(iter(test_data))[0])
    return models


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PLUGIN_MODELS))
def test_every_plugin_model_is_a_plugin_model(built, name):
    model, _ = built[name]
    assert isinstance(model, PluginModel) and isinstance(model, Exportable)
    assert isinstance(model.item_embedding, torch.nn.Embedding)
    state = model.checkpoint_state_dict()
    if name == "BERTRec":  # fully fine-tuned: the whole model, no backbone to identify
        assert model.backbone_hash is None and state.keys() == model.state_dict().keys()
        assert model.merge_adapters() is False
        model.after_optimizer_step(1)
    else:  # frozen backbone: what trained, and the backbone's hash
        assert isinstance(model.backbone_hash, str) and "backbone_sha256" in state
        assert set(state) - {"backbone_sha256"} < set(model.state_dict())


@pytest.mark.parametrize("name", list(PLUGIN_MODELS))
def test_methods_have_the_protocols_signatures(name):
    cls = get_plugin_model(name)
    for method in ("export_scores", "checkpoint_state_dict", "after_optimizer_step", "merge_adapters",
                   "bake_item_table"):
        declared = list(inspect.signature(getattr(PluginModel, method)).parameters)
        assert list(inspect.signature(getattr(cls, method)).parameters) == declared, (name, method)


@pytest.mark.parametrize("name", list(PLUGIN_MODELS))
def test_export_scores_equal_full_sort_predict(built, name, monkeypatch):
    """RecBole's evaluation (full_sort_predict) encodes groups of rows of similar length, each cut to its
    longest history; export_scores the whole batch at its width: the same scores, to float rounding."""
    model, batch = built[name]
    monkeypatch.setattr(bertrec, "EVAL_GROUP_ROWS", 3)  # groups of 3 rows: several widths in this batch
    # the test users' histories cut to 1..width items (ml-tiny's fill the width), in no order of length
    width = batch[model.ITEM_SEQ].size(1)
    lengths = 1 + (torch.arange(len(batch)) * 7) % width
    item_seq = batch[model.ITEM_SEQ] * (torch.arange(width) < lengths.unsqueeze(1))
    with torch.no_grad():
        expected = model.full_sort_predict({model.ITEM_SEQ: item_seq, model.ITEM_SEQ_LEN: lengths})
        actual = model.export_scores(item_seq, lengths)
    assert actual.shape == expected.shape == (len(batch), model.n_items)
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-5), (actual - expected).abs().max()


class ExportScores(torch.nn.Module):
    def __init__(self, model: PluginModel):
        super().__init__()
        self.model = model

    def forward(self, item_seq: torch.Tensor, item_length: torch.Tensor) -> torch.Tensor:
        return self.model.export_scores(item_seq, item_length)


def test_export_scores_traces_for_any_batch_size(built):
    model, batch = built["BERTLoRA"]
    item_seq, item_length = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    with torch.no_grad():
        traced = torch.jit.trace(ExportScores(model), (item_seq[:4], item_length[:4]), check_trace=False)
        assert torch.allclose(traced(item_seq, item_length), model.export_scores(item_seq, item_length), atol=1e-5)


# (model, key, bad value, extra settings): the key must be named in the one-line error
BAD_VALUES = [
    ("BERTRec", "pre_encoder", "gru", {}),
    ("BERTRec", "item_repr", "foo", {}),
    ("BERTRec", "text_encoder", "cached", {}),
    ("BERTRec", "item_text_max_tokens", 0, {}),
    ("BERTRec", "item_text_fields", None, {"item_repr": "text"}),
    ("BERTRec", "item_text_fields", 3, {}),
    ("BERTRec", "initializer_range", -1, {}),
    ("BERTRec", "loss_type", None, {}),
    ("BERTRec", "loss_type", "MSE", {}),  # refused by Config, for every sequential model
    ("BERTRec", "train_positions", "every", {}),
    ("BERTRec", "train_positions", "all", {"loss_type": "BPR"}),
    ("BERTRec", "train_window_stride", 2, {}),  # train_positions: last has no windows
    ("BERTRec", "train_window_stride", 0, {"train_positions": "all"}),
    ("BERTRec", "train_window_stride", 2.5, {"train_positions": "all"}),
    ("BERTRec", "train_window_stride", True, {"train_positions": "all"}),
    # the encoder's keys, checked when the Config is built
    ("BERTRec", "pretrained_model_name_or_path", 5, {}),
    ("BERTRec", "n_layers", 0, {}),
    ("BERTRec", "hidden_act", "swishy", {}),
    ("BERTRec", "layer_norm_eps", 0, {}),
    ("BERTRec", "hidden_size", 10_000_000, {"n_heads": 1}),  # terabytes of weights and optimizer state
    ("BERTRec", "hidden_dropout_prob", 1.5, {}),
    ("BERTRec", "attn_dropout_prob", -0.1, {}),
    ("BERTPEFT", "peft_type", "NOPE", {}),
    ("BERTPEFT", "peft_type", None, {}),
    ("BERTLoRA", "r", 0, {}),
    ("BERTLoRA", "r", "eight", {}),
    ("BERTAdapter", "adapter_size", 0, {}),
    ("BERTAdapter", "adapter_act", "tanh", {}),
    ("BERTAdaLoRA", "tinit_ratio", 1.5, {}),
    ("BERTAdaLoRA", "tfinal_ratio", None, {}),
    ("BERTAdaLoRA", "total_step", 5, {}),
    ("BERTAdaLoRA", "tinit", "soon", {}),
    ("BERTAdaLoRA", "tfinal", -1, {}),
    # peft's values that failed mid-training, inside its layers
    ("BERTLoRA", "lora_dropout", "x", {}),
    ("BERTLoRA", "lora_alpha", 0, {}),
    ("BERTLoRA", "target_modules", 5, {}),
    ("BERTAdaLoRA", "deltaT", 0, {}),
    ("BERTAdaLoRA", "target_r", 99, {}),
    # the trainer's keys, once refused only when the trainer was built (after the data and the model)
    ("BERTRec", "lr_scheduler", "cosin", {}),
    ("BERTRec", "warmup_ratio", 2, {}),
    ("BERTRec", "mixed_precision", "fp8", {}),
    ("BERTRec", "augmentation_prob", 1.5, {}),
    # values RecBole read by truth, or compared after the first epoch
    ("BERTRec", "repeatable", "no", {}),
    ("BERTRec", "MAX_ITEM_LIST_LENGTH", None, {}),
    ("BERTRec", "valid_metric", "NDCG@50", {}),
]


@pytest.fixture(scope="module")
def dataset(settings):
    """One dataset for every bad-value case: the keys are refused before it matters whose it is."""
    return create_dataset(Config(model="BERTRec", dataset="ml-tiny", config_dict=settings))


@pytest.mark.parametrize("name, key, value, extra", BAD_VALUES, ids=[f"{m}-{k}={v!r}" for m, k, v, _ in BAD_VALUES])
def test_a_bad_value_is_refused_in_one_line_naming_the_key(settings, dataset, name, key, value, extra):
    with pytest.raises(RecboleLLMError) as error:
        config = Config(model=name, dataset="ml-tiny", config_dict={**settings, **extra, key: value})
        get_model(name)(config, dataset)
    message = str(error.value)
    assert f"{key}={value!r}" in message and "\n" not in message, message


def test_an_encoder_folder_without_whole_weights_is_one_line(settings, dataset, tmp_path):
    """A folder with config.json alone, or weights cut short, failed in transformers' traceback at model build."""
    import shutil
    from pathlib import Path

    from recbole_llm.model.backbone import DEFAULT_PRETRAINED, resolve_pretrained

    source, folder = Path(resolve_pretrained(DEFAULT_PRETRAINED)), tmp_path / "encoder"
    folder.mkdir()
    shutil.copy(source / "config.json", folder)
    given = {**settings, "pretrained_model_name_or_path": str(folder)}
    with pytest.raises(RecboleLLMError, match=f"'{folder}' has no weights .model.safetensors"):
        Config(model="BERTRec", dataset="ml-tiny", config_dict=given)
    (folder / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[:4096])
    with pytest.raises(RecboleLLMError, match=f"'{folder}': its weights do not load") as error:
        get_model("BERTRec")(Config(model="BERTRec", dataset="ml-tiny", config_dict=given), dataset)
    assert "\n" not in str(error.value)


def test_pretrained_only_keys_are_checked_against_the_encoder(settings, dataset):
    pretrained = {**settings, "pretrained_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}
    for key, value in (("backbone_layers", 9), ("backbone_layers", "two"), ("MAX_ITEM_LIST_LENGTH", 1000)):
        with pytest.raises(RecboleLLMError) as error:
            Config(model="BERTRec", dataset="ml-tiny", config_dict={**pretrained, key: value})
        assert f"{key}={value!r}" in str(error.value) and "\n" not in str(error.value)


def test_defaults_live_in_the_yaml(settings):
    """Every key a model reads has its default in properties/<Model>.yaml, not in the code."""
    for name in PLUGIN_MODELS:
        config = Config(model=name, dataset="ml-tiny", config_dict=settings)
        for key in ("item_repr", "text_encoder", "item_text_max_tokens", "initializer_range", "loss_type"):
            assert config[key] is not None, (name, key)
    adapter = Config(model="BERTAdapter", dataset="ml-tiny", config_dict=settings)
    assert (adapter["adapter_size"], adapter["adapter_act"]) == (64, "gelu")
