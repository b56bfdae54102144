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


@pytest.mark.slow
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


# recbole.utils.get_model's search order (a list inside that function)
RECBOLE_PACKAGES = ("general_recommender", "context_aware_recommender", "sequential_recommender",
                    "knowledge_aware_recommender", "exlib_recommender")


def recbole_registry() -> tuple[dict[str, type], dict[str, str]]:
    """RecBole's models found by importing its model packages as its get_model does: the classes named like
    their module, and the modules of packages that cannot be imported (module -> the missing package)."""
    import importlib
    import inspect
    import pkgutil

    import recbole.model

    subpackages = {m.name for m in pkgutil.iter_modules(recbole.model.__path__) if m.ispkg}
    assert subpackages == set(RECBOLE_PACKAGES)  # a new RecBole package would need a look here
    classes, unimportable, searched = {}, {}, set()
    for package in RECBOLE_PACKAGES:
        spec = importlib.util.find_spec(f"recbole.model.{package}")
        modules = [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations) if not m.ispkg]
        try:
            importlib.import_module(f"recbole.model.{package}")
        except ModuleNotFoundError as error:
            unimportable.update({module: error.name for module in modules if module not in searched})
            searched.update(modules)
            continue
        for module in modules:
            if module in searched:
                continue
            searched.add(module)
            loaded = importlib.import_module(f"recbole.model.{package}.{module}")
            classes.update({name: obj for name, obj in vars(loaded).items()
                            if inspect.isclass(obj) and name.lower() == module})
    return classes, unimportable


def test_every_recbole_model_resolves_as_in_recbole():
    import recbole.quick_start.quick_start as quick_start
    import recbole.utils

    import recbole_llm
    from recbole_llm.model.catalog import PLUGIN_MODELS, recbole_model_names

    recbole_get_model = recbole.utils.get_model.__wrapped__  # RecBole's own, without the plugin
    anomaly = torch.is_anomaly_enabled()
    try:
        classes, unimportable = recbole_registry()
        assert "Random" in classes and len(classes) > 80
        for name, cls in classes.items():
            assert recbole_get_model(name) is cls
            assert recbole.utils.get_model(name) is cls, name
            assert quick_start.get_model(name) is cls, name
        # optional dependencies missing here (lightgbm, xgboost): a one-line error naming what to install
        for module, missing in unimportable.items():
            (name,) = [n for n in recbole_llm.available_models() if n.lower() == module]
            with pytest.raises(ModuleNotFoundError):
                recbole_get_model(name)
            with pytest.raises(RecboleLLMError) as error:
                recbole.utils.get_model(name)
            message = str(error.value)
            assert f"model '{name}' needs" in message and f"pip install {missing}" in message, message
            assert "\n" not in message
            classes[name] = None
    finally:
        torch.autograd.set_detect_anomaly(anomaly)  # sine.py switches it on at import
    assert sorted(classes, key=str.lower) == recbole_model_names()
    assert recbole_llm.available_models() == list(PLUGIN_MODELS) + recbole_model_names()
    assert {"Random", "LightGBM", "XGBoost"} <= set(classes) and "lightgbm" not in classes


@pytest.mark.parametrize("name, suggestion", [
    ("lightgbm", "LightGBM"),  # RecBole's YAML file name, not its model name
    ("sasrec", "SASRec"),
    ("Randomm", "Random"),
])
def test_unknown_names_still_get_one_line_with_a_suggestion(name, suggestion):
    import recbole.utils

    with pytest.raises(RecboleLLMError) as error:
        recbole.utils.get_model(name)
    message = str(error.value)
    assert message.startswith(f"unknown model '{name}'. Did you mean '{suggestion}'?") and "\n" not in message
    assert "Random" in message.split("Available models: ")[1].split(", ")


@pytest.mark.slow
def test_random_runs_with_the_plugin_imported(data_root):
    from recbole.quick_start import run_recbole

    result = run_recbole(model="Random", dataset="ml-tiny", config_dict={
        "data_path": str(data_root), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "show_progress": False, "topk": [10], "metrics": ["Recall"], "valid_metric": "Recall@10",
        "save_model": False,
    })
    assert 0.0 <= result["test_result"]["recall@10"] <= 1.0


def test_models_command_lists_recboles_models(capsys):
    from recbole_llm.cli import main

    assert main(["models"]) == 0
    rows = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert rows["BERTRec"] == "recbole_llm"
    assert rows["Random"] == rows["LightGBM"] == rows["XGBoost"] == rows["SASRec"] == "recbole"
    assert "lightgbm" not in rows


@pytest.mark.slow
def test_command_line_names_the_package_a_model_needs(data_root):
    import importlib.util

    from helpers import assert_one_line_error, cli, slice_args

    if importlib.util.find_spec("lightgbm") is not None:
        pytest.skip("lightgbm is installed here")
    assert_one_line_error(cli("run", "--model=LightGBM", "--dataset=ml-tiny", *slice_args(data_root)),
                          "model 'LightGBM' needs lightgbm", "pip install lightgbm")


def test_the_public_api_is_what_readme_imports_and_each_name_loads():
    """``from recbole_llm import ...`` is the API README uses; every name resolves to its one definition."""
    import recbole_llm
    from recbole_llm.export.pipeline import export_checkpoint
    from recbole_llm.serving.runtime import Recommender

    assert sorted(recbole_llm.__all__) == sorted([
        "RecboleLLMError", "Recommender", "Recommendation", "ExportOptions", "export_checkpoint",
        "load_checkpoint", "available_models", "__version__"])
    assert recbole_llm.Recommender is Recommender and recbole_llm.export_checkpoint is export_checkpoint
    for name in recbole_llm.__all__:
        assert getattr(recbole_llm, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'runtime_of'"):
        recbole_llm.runtime_of  # noqa: B018
