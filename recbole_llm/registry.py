"""Registration: RecBole's own entry points find the plugin's models and their property files.

RecBole looks models up by module name (``recbole.model.<kind>.<name.lower()>``) and reads a model's
defaults from ``recbole/properties/model/<Model>.yaml``. Like RecBole-GNN, the plugin looks up its own
models first and falls back to RecBole's; unlike RecBole-GNN it does so inside RecBole's own functions, so
``run_recbole``, ``objective_function``, ``load_data_and_model`` and ``Config`` need no plugin-specific
entry point.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
from pathlib import Path
from typing import Callable

from recbole_llm.errors import RecboleLLMError

# Plugin model name -> "module:Class". Imported lazily so that `import recbole_llm` stays cheap.
PLUGIN_MODELS: dict[str, str] = {
    "BERTRec": "recbole_llm.model.bertrec:BERTRec",
    "BERTLoRA": "recbole_llm.model.bertlora:BERTLoRA",
    "BERTAdaLoRA": "recbole_llm.model.bertadalora:BERTAdaLoRA",
    "BERTAdapter": "recbole_llm.model.bertadapter:BERTAdapter",
    "BERTPEFT": "recbole_llm.model.bertpeft:BERTPEFT",
}

# Read for every plugin model before its own YAML: the plugin trainer's keys.
TRAINER_YAML = "PluginTrainer.yaml"


def properties_dir() -> Path:
    """The folder holding one ``<Model>.yaml`` per plugin model.

    In a wheel it is the package ``recbole_llm.properties``; in a source checkout it is ``properties/``
    at the repository root (pyproject maps one onto the other).
    """
    try:
        from importlib.resources import files

        installed = Path(str(files("recbole_llm.properties")))
        if installed.is_dir():
            return installed
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "properties"


def plugin_model_yamls(model_name: str) -> list[Path]:
    """The property files of a plugin model, most general first; empty for RecBole's own models.

    The plugin trainer's YAML, then one YAML per plugin class along the model's inheritance chain
    (BERTRec.yaml, BERTPEFT.yaml, BERTLoRA.yaml): a subclass's YAML overrides only what differs.
    """
    if model_name not in PLUGIN_MODELS:
        return []
    folder = properties_dir()
    names = [TRAINER_YAML]
    names += [f"{cls.__name__}.yaml" for cls in reversed(get_plugin_model(model_name).__mro__) if cls.__name__ in PLUGIN_MODELS]
    return [folder / name for name in names if (folder / name).is_file()]


def recbole_model_names() -> list[str]:
    """RecBole's own model names, read from its property files (one YAML per model)."""
    import recbole

    folder = Path(recbole.__file__).parent / "properties" / "model"
    return sorted(p.stem for p in folder.glob("*.yaml"))


def available_models() -> list[str]:
    """Every model name ``get_model`` accepts: the plugin's first, then RecBole's."""
    return list(PLUGIN_MODELS) + recbole_model_names()


def get_plugin_model(model_name: str) -> type:
    module_name, class_name = PLUGIN_MODELS[model_name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def _wrap_get_model(recbole_get_model: Callable[[str], type]) -> Callable[[str], type]:
    @functools.wraps(recbole_get_model)
    def get_model(model_name: str) -> type:
        if model_name in PLUGIN_MODELS:
            return get_plugin_model(model_name)
        if model_name in recbole_model_names():
            return recbole_get_model(model_name)
        # RecBole would walk its model packages and fail on an optional one ("No module named
        # 'lightgbm'"), which says nothing about the real mistake.
        names = available_models()
        close = difflib.get_close_matches(model_name, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecboleLLMError(
            f"unknown model '{model_name}'.{hint} Available models: {', '.join(names)}"
        )

    get_model.__recbole_llm__ = True
    return get_model


def _wrap_get_trainer(recbole_get_trainer: Callable) -> Callable:
    @functools.wraps(recbole_get_trainer)
    def get_trainer(model_type, model_name):
        if model_name in PLUGIN_MODELS:
            from recbole_llm.trainer import PluginTrainer

            return PluginTrainer
        return recbole_get_trainer(model_type, model_name)

    get_trainer.__recbole_llm__ = True
    return get_trainer


# Every module that bound RecBole's functions by name at import time.
_MODULES_BINDING_GET_MODEL = (
    "recbole.utils",
    "recbole.utils.utils",
    "recbole.config.configurator",
    "recbole.quick_start.quick_start",
    "recbole.quick_start",
    "recbole.data.dataloader.abstract_dataloader",
)
_MODULES_BINDING_GET_TRAINER = (
    "recbole.utils",
    "recbole.utils.utils",
    "recbole.quick_start.quick_start",
    "recbole.quick_start",
)


def _rebind(module_names: tuple[str, ...], attribute: str, wrap: Callable) -> None:
    original = getattr(importlib.import_module("recbole.utils.utils"), attribute)
    if getattr(original, "__recbole_llm__", False):
        return  # already installed
    wrapped = wrap(original)
    for module_name in module_names:
        module = importlib.import_module(module_name)
        if hasattr(module, attribute):
            setattr(module, attribute, wrapped)


def _install_property_files() -> None:
    """Read a plugin model's YAML exactly where RecBole reads its own models' YAML.

    RecBole's ``Config._load_internal_config_dict`` reads overall.yaml, then the model's YAML, then the
    dataset and quick-start YAMLs, then the user's files, dicts and command line. The plugin's YAML is
    read right after overall.yaml, which gives it the same precedence as a built-in model's YAML.
    """
    from recbole.config import configurator

    Config = configurator.Config
    if getattr(Config._update_internal_config_dict, "__recbole_llm__", False):
        return
    original = Config._update_internal_config_dict
    overall_yaml = os.path.realpath(
        os.path.join(os.path.dirname(configurator.__file__), "../properties/overall.yaml")
    )

    @functools.wraps(original)
    def _update_internal_config_dict(self, file):
        config_dict = original(self, file)
        if os.path.realpath(file) == overall_yaml:
            for model_yaml in plugin_model_yamls(getattr(self, "model", None) or ""):
                original(self, str(model_yaml))
        return config_dict

    _update_internal_config_dict.__recbole_llm__ = True
    Config._update_internal_config_dict = _update_internal_config_dict


def _wrap_get_flops(recbole_get_flops: Callable) -> Callable:
    """RecBole's FLOPs count, on the merged model for peft models.

    thop registers a ``total_ops`` buffer on every module; a peft wrapper forwards attribute lookups to
    the module it wraps, which already has one, and RecBole's count fails. Counting a merged copy
    measures what inference runs.
    """

    @functools.wraps(recbole_get_flops)
    def get_flops(model, dataset, device, logger, transform, verbose=False):
        from peft import PeftModel

        if not any(isinstance(module, PeftModel) for module in model.modules()):
            return recbole_get_flops(model, dataset, device, logger, transform, verbose)
        import copy

        merged = copy.deepcopy(model)
        if not merged.merge_adapters():
            logger.info(f"FLOPs are not counted for {type(model).__name__}: its adapters cannot merge")
            return 0
        return recbole_get_flops(merged, dataset, device, logger, transform, verbose)

    get_flops.__recbole_llm__ = True
    return get_flops


def install() -> None:
    """Make RecBole's entry points aware of the plugin's models. Idempotent."""
    _rebind(_MODULES_BINDING_GET_MODEL, "get_model", _wrap_get_model)
    _rebind(_MODULES_BINDING_GET_TRAINER, "get_trainer", _wrap_get_trainer)
    _rebind(("recbole.utils", "recbole.utils.utils", "recbole.quick_start.quick_start"), "get_flops", _wrap_get_flops)
    _install_property_files()
