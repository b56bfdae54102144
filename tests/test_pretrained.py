"""The default pretrained encoder loads offline from the pip-installed package, for a batch or two."""

from __future__ import annotations

import pytest
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model

from recbole_llm import RecboleLLMError
from recbole_llm.model.backbone import DEFAULT_PRETRAINED, resolve_pretrained


@pytest.fixture(scope="module")
def slice_data(data_root):
    config = Config(
        model="BERTRec",
        dataset="ml-slice",
        config_dict={
            "data_path": str(data_root),
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "MAX_ITEM_LIST_LENGTH": 20,
            "show_progress": False,
            "train_batch_size": 32,
        },
    )
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    return config, train_data


def pretrained_weights() -> dict:
    from safetensors.torch import load_file

    return load_file(f"{resolve_pretrained(DEFAULT_PRETRAINED)}/model.safetensors")


@pytest.mark.slow
def test_default_is_the_bundled_minilm_loaded_offline(slice_data):
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    config, train_data = slice_data
    config["backbone_layers"] = 2
    model = get_model("BERTRec")(config, train_data._dataset)
    assert model.encoder.config.hidden_size == 384
    assert len(model.encoder.encoder.layer) == 2  # truncated to the first two of six layers
    weights = pretrained_weights()
    kept = model.encoder.encoder.layer[1].attention.self.query.weight
    prefix = "" if "encoder.layer.1.attention.self.query.weight" in weights else "bert."
    assert torch.equal(kept, weights[prefix + "encoder.layer.1.attention.self.query.weight"])

    # a batch or two through RecBole's data, forward and backward: the pretrained weights fine-tune
    before = kept.detach().clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _, batch in zip(range(2), train_data):
        loss = model.calculate_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert model.encoder.encoder.layer[0].output.dense.weight.grad is not None
    assert not torch.equal(model.encoder.encoder.layer[1].attention.self.query.weight, before)


def test_local_directory_loads_the_same_as_the_hub_id(slice_data):
    config, train_data = slice_data
    config["backbone_layers"] = 1
    by_id = get_model("BERTRec")(config, train_data._dataset)
    config["pretrained_model_name_or_path"] = resolve_pretrained(DEFAULT_PRETRAINED)
    by_path = get_model("BERTRec")(config, train_data._dataset)
    config["pretrained_model_name_or_path"] = DEFAULT_PRETRAINED
    for (name, a), (_, b) in zip(by_id.encoder.state_dict().items(), by_path.encoder.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"backbone_layers": 7},
         r"backbone_layers=7 must be an integer from 1 to 6: .* \('sentence-transformers/all-MiniLM-L6-v2' has 6 layers"),
        ({"backbone_layers": 0}, "backbone_layers=0 must be an integer from 1 to 6.*null keeps them all"),
        ({"MAX_ITEM_LIST_LENGTH": 600}, "MAX_ITEM_LIST_LENGTH=600 exceeds the 512 positions"),
        ({"pretrained_model_name_or_path": "no-such-org/no-such-model"}, "could not be loaded"),
    ],
)
def test_bad_encoder_settings_fail_at_construction(slice_data, override, fragment):
    config, train_data = slice_data
    saved = {key: config[key] for key in override}
    for key, value in override.items():
        config[key] = value
    try:
        with pytest.raises(RecboleLLMError, match=fragment):
            get_model("BERTRec")(config, train_data._dataset)
    finally:
        for key, value in saved.items():
            config[key] = value
