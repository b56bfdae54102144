"""Which models exist, by name: the plugin's and RecBole's own. A leaf: it imports no other plugin module.

The checkpoint loader (a checkpoint must name a known model), the registration of models with RecBole and
the Config checks all ask this module, so none of them needs to import another.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import pkgutil
import warnings
from pathlib import Path

# Plugin model name -> "module:Class". Imported lazily so that `import recbole_llm` stays cheap.
PLUGIN_MODELS: dict[str, str] = {
    "BERTRec": "recbole_llm.model.bertrec:BERTRec",
    "BERTLoRA": "recbole_llm.model.bertlora:BERTLoRA",
    "BERTAdaLoRA": "recbole_llm.model.bertadalora:BERTAdaLoRA",
    "BERTAdapter": "recbole_llm.model.bertadapter:BERTAdapter",
    "BERTPEFT": "recbole_llm.model.bertpeft:BERTPEFT",
}

# The packages recbole.utils.get_model searches, in its order: a model is the class named like the first
# module ``recbole.model.<package>.<name.lower()>`` found there.
RECBOLE_MODEL_PACKAGES = (
    "general_recommender",
    "context_aware_recommender",
    "sequential_recommender",
    "knowledge_aware_recommender",
    "exlib_recommender",
)


def recommender_class(module: str, name: str) -> type | None:
    """A RecBole or plugin model class named by a checkpoint (its Config's ``model_class``), else None.

    Only modules inside ``recbole.model`` or :data:`PLUGIN_MODELS` are imported, and only a subclass of
    RecBole's ``AbstractRecommender`` is returned: a value for the checkpoint loaders, never called there.
    """
    from recbole.model.abstract_recommender import AbstractRecommender

    plugin_modules = {target.split(":")[0] for target in PLUGIN_MODELS.values()}
    if not (module.startswith("recbole.model.") or module in plugin_modules):
        return None
    try:
        candidate = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    if isinstance(candidate, type) and issubclass(candidate, AbstractRecommender):
        return candidate
    return None


def get_plugin_model(model_name: str) -> type:
    """The class of a plugin model, imported on first use."""
    module_name, class_name = PLUGIN_MODELS[model_name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


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
            for name in _defined_names(module_source(module)):
                if name.lower() == module.name:
                    models[name] = f"recbole.model.{package}.{module.name}"
    return models


def recbole_model_names() -> list[str]:
    """RecBole's own model names (``recbole_models``), sorted case-insensitively."""
    return sorted(recbole_models(), key=str.lower)


def available_models() -> list[str]:
    """Every model name ``get_model`` accepts: the plugin's first, then RecBole's."""
    return list(PLUGIN_MODELS) + recbole_model_names()


def module_source(module: pkgutil.ModuleInfo) -> Path | None:
    """The source file of a module that ``pkgutil.iter_modules`` listed, without importing it."""
    spec = module.module_finder.find_spec(module.name)
    return Path(spec.origin) if spec is not None and spec.origin else None


def _parsed(path: Path | None) -> ast.Module:
    try:
        with warnings.catch_warnings():  # RecBole's sources have invalid escapes: its business, not the user's
            warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
            return ast.parse(path.read_text(encoding="utf-8"), str(path)) if path is not None else ast.Module(body=[])
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


def third_party_imports(path: Path | None) -> set[str]:
    """Top-level packages a module imports, RecBole excluded."""
    roots = set()
    for node in _parsed(path).body:
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            roots.add(node.module.split(".")[0])
    return roots - {"recbole", "__future__"}
