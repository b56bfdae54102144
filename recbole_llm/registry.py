"""Registration: RecBole's own entry points find the plugin's models and their property files.

RecBole looks models up by module name (``recbole.model.<kind>.<name.lower()>``) and reads a model's
defaults from ``recbole/properties/model/<Model>.yaml``. Like RecBole-GNN, the plugin looks up its own
models first and falls back to RecBole's; unlike RecBole-GNN it does so inside RecBole's own functions, so
``run_recbole``, ``objective_function``, ``load_data_and_model`` and ``Config`` need no plugin-specific
entry point.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import importlib.util
import os
import pkgutil
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


# The packages recbole.utils.get_model searches, in its order: a model is the class named like the first
# module ``recbole.model.<package>.<name.lower()>`` found there.
RECBOLE_MODEL_PACKAGES = (
    "general_recommender",
    "context_aware_recommender",
    "sequential_recommender",
    "knowledge_aware_recommender",
    "exlib_recommender",
)


@functools.lru_cache(maxsize=None)
def recbole_models() -> dict[str, str]:
    """RecBole's own models, ``{name: "recbole.model.<package>.<module>"}``, as ``recbole.utils.get_model``
    finds them: each module of its model packages and the class in it whose lower-cased name is the module's.

    The modules are read, not imported: importing them all takes seconds, switches autograd anomaly detection
    on (sine.py) and fails on optional dependencies (exlib_recommender needs lightgbm and xgboost), while
    listing names must not. Models without a property file (``Random``) or with a lower-case one
    (``LightGBM``: lightgbm.yaml) are found too.
    """
    models: dict[str, str] = {}
    searched: set[str] = set()
    for package in RECBOLE_MODEL_PACKAGES:
        spec = importlib.util.find_spec(f"recbole.model.{package}")  # imports recbole.model, not the package
        if spec is None or not spec.submodule_search_locations:
            continue
        for module in pkgutil.iter_modules(spec.submodule_search_locations):
            if module.ispkg or module.name in searched:
                continue  # get_model stops at the first package holding a module of that name
            searched.add(module.name)
            for name in _defined_names(_module_source(module)):
                if name.lower() == module.name:
                    models[name] = f"recbole.model.{package}.{module.name}"
    return models


def _module_source(module: pkgutil.ModuleInfo) -> Path | None:
    spec = module.module_finder.find_spec(module.name)
    return Path(spec.origin) if spec is not None and spec.origin else None


def _parsed(path: Path | None) -> ast.Module:
    try:
        return ast.parse(path.read_text(encoding="utf-8")) if path is not None else ast.Module(body=[])
    except (OSError, SyntaxError, UnicodeDecodeError):
        return ast.Module(body=[])


def _defined_names(path: Path | None) -> list[str]:
    """Top-level names a module binds to classes: its ``class`` statements and ``from ... import`` names."""
    names = []
    for node in _parsed(path).body:
        if isinstance(node, ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.ImportFrom):
            names += [alias.asname or alias.name for alias in node.names]
    return names


def _third_party_imports(path: Path | None) -> set[str]:
    """Top-level packages a module imports, RecBole excluded."""
    roots = set()
    for node in _parsed(path).body:
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            roots.add(node.module.split(".")[0])
    return roots - {"recbole", "__future__"}


def recbole_model_names() -> list[str]:
    """RecBole's own model names (``recbole_models``), sorted case-insensitively."""
    return sorted(recbole_models(), key=str.lower)


def available_models() -> list[str]:
    """Every model name ``get_model`` accepts: the plugin's first, then RecBole's."""
    return list(PLUGIN_MODELS) + recbole_model_names()


def get_plugin_model(model_name: str) -> type:
    """The class of a plugin model, imported on first use."""
    module_name, class_name = PLUGIN_MODELS[model_name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def _missing_packages(module_name: str, error: ModuleNotFoundError) -> list[str]:
    """Packages a RecBole model needs that are not installed: the one that failed to import and any other
    top-level import of the model's module that is absent (XGBoost: its package imports lightgbm first)."""
    missing = {(error.name or "").split(".")[0]} - {"", "recbole"}
    package, _, module = module_name.rpartition(".")
    spec = importlib.util.find_spec(package)  # imports recbole.model, not the package that failed
    if spec is not None and spec.submodule_search_locations:
        for info in pkgutil.iter_modules(spec.submodule_search_locations):
            if info.name == module:
                missing |= {name for name in _third_party_imports(_module_source(info))
                            if importlib.util.find_spec(name) is None}
    return sorted(missing)


def _unknown_model(model_name: str) -> RecboleLLMError:
    names = available_models()
    same_but_case = [name for name in names if name.lower() == model_name.lower()]
    close = same_but_case or difflib.get_close_matches(model_name, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return RecboleLLMError(f"unknown model '{model_name}'.{hint} Available models: {', '.join(names)}")


def _wrap_get_model(recbole_get_model: Callable[[str], type]) -> Callable[[str], type]:
    @functools.wraps(recbole_get_model)
    def get_model(model_name: str) -> type:
        if model_name in PLUGIN_MODELS:
            return get_plugin_model(model_name)
        module_name = recbole_models().get(model_name)
        if module_name is None:
            # RecBole would walk its model packages and fail on an optional one ("No module named
            # 'lightgbm'") or on a class name in the wrong case, which says nothing about the real mistake.
            raise _unknown_model(model_name)
        try:
            return recbole_get_model(model_name)
        except ModuleNotFoundError as error:
            missing = _missing_packages(module_name, error)
            if not missing:
                raise
            raise RecboleLLMError(
                f"model '{model_name}' needs {' and '.join(missing)}, not installed; install "
                f"{'it' if len(missing) == 1 else 'them'}: pip install {' '.join(missing)}"
            ) from None

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
