"""RecBole's own entry points find the plugin's models, with RecBole's config precedence."""

from __future__ import annotations

import pytest
import torch
from recbole.config import Config

from recbole_llm import RecboleLLMError
from recbole_llm.model.bertrec import BERTRec


def test_recbole_get_model_finds_plugin_and_builtin_models():
    import recbole.quick_start.quick_start as quick_start
    import recbole.utils
    from recbole.model.sequential_recommender.sasrec import SASRec

    assert recbole.utils.get_model("BERTRec") is BERTRec
    assert quick_start.get_model("BERTRec") is BERTRec
    assert recbole.utils.get_model("SASRec") is SASRec


def test_unknown_model_names_it_and_lists_the_available_ones():
    import recbole.utils

    with pytest.raises(RecboleLLMError) as error:
        recbole.utils.get_model("BERTRecc")
    message = str(error.value)
    assert "unknown model 'BERTRecc'" in message
    assert "Did you mean 'BERTRec'?" in message
    assert "BERTRec" in message and "SASRec" in message and "GRU4Rec" in message
    assert "lightgbm" not in message.split("Available")[0]  # not RecBole's misleading import error
    assert "\n" not in message


def test_config_reads_the_plugin_yaml(base_config):
    config = Config(model="BERTRec", dataset="ml-slice", config_dict=base_config)
    assert config["model"] == "BERTRec"
    assert config.model_class is BERTRec
    assert config["pretrained_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert config["pre_encoder"] is None
    assert config["loss_type"] == "CE"
    # CE needs no negative sampling: RecBole's overall.yaml default sampler is dropped
    assert config["train_neg_sample_args"]["distribution"] == "none"


def test_yaml_precedence_matches_recbole(base_config, tmp_path, monkeypatch):
    """command line > config_dict > config files > model YAML > RecBole defaults."""
    config_file = tmp_path / "user.yaml"
    config_file.write_text("inner_size: 100\nn_heads: 4\nn_layers: 3\n")
    config_dict = {**base_config, "n_heads": 8, "n_layers": 5}
    monkeypatch.setattr("sys.argv", ["prog", "--n_layers=7"])
    config = Config(
        model="BERTRec", dataset="ml-slice", config_file_list=[str(config_file)], config_dict=config_dict
    )
    assert config["n_layers"] == 7  # command line beats config_dict
    assert config["n_heads"] == 8  # config_dict beats the config file
    assert config["inner_size"] == 100  # config file beats the model YAML (256)
    assert config["train_batch_size"] == 256  # model YAML beats RecBole's overall.yaml (2048)
    assert config["learning_rate"] == 0.001  # RecBole's default where nobody else sets it


def test_bpr_keeps_recbole_negative_sampling(base_config):
    config = Config(model="BERTRec", dataset="ml-slice", config_dict={**base_config, "loss_type": "BPR"})
    assert config["train_neg_sample_args"]["distribution"] == "uniform"


def test_builtin_sasrec_default_config_starts(base_config):
    # RecBole 1.2.1 itself raises "train_neg_sample_args should be None when the loss_type is CE" here.
    config = Config(model="SASRec", dataset="ml-slice", config_dict=base_config)
    assert config["loss_type"] == "CE"
    assert config["train_neg_sample_args"]["distribution"] == "none"


@pytest.mark.parametrize("model", ["BERTRec", "SASRec"])
def test_anomaly_detection_off_by_default_and_on_by_key(base_config, model):
    import recbole.model.sequential_recommender.sine  # noqa: F401  (what switches it on in RecBole)

    Config(model=model, dataset="ml-slice", config_dict=base_config)
    assert not torch.is_anomaly_enabled()
    Config(model=model, dataset="ml-slice", config_dict={**base_config, "detect_anomaly": True})
    assert torch.is_anomaly_enabled()
    Config(model=model, dataset="ml-slice", config_dict=base_config)
    assert not torch.is_anomaly_enabled()


def test_objective_function_runs_plugin_model(tiny_bert, caplog):
    from recbole.quick_start import objective_function

    result = objective_function(
        config_dict={**tiny_bert, "model": "BERTRec", "dataset": "ml-slice", "epochs": 1}, saved=False
    )
    assert result["model"] == "BERTRec"
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
    assert "Session not detected" not in caplog.text  # ray's noise about tune.report outside a tuner


def test_missing_dataset_is_a_clear_error_not_a_download_prompt(base_config, tmp_path):
    from recbole.quick_start import run_recbole

    empty = tmp_path / "empty"
    empty.mkdir()
    for dataset, mentions_download in (("ml-1m", True), ("no-such-data", False)):
        with pytest.raises(RecboleLLMError) as error:
            run_recbole(model="BERTRec", dataset=dataset, config_dict={**base_config, "data_path": str(empty)})
        message = str(error.value)
        assert f"dataset '{dataset}' not found" in message and str(empty / dataset) in message
        assert "data_path" in message
        assert ("allow_download" in message) == mentions_download
