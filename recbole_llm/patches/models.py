"""Registration: RecBole's own entry points find the plugin's models and their property files.

RecBole looks models up by module name (``recbole.model.<kind>.<name.lower()>``) and reads a model's
defaults from ``recbole/properties/model/<Model>.yaml``. Like RecBole-GNN, the plugin looks up its own
models first and falls back to RecBole's; unlike RecBole-GNN it does so inside RecBole's own functions, so
``run_recbole``, ``objective_function``, ``load_data_and_model`` and ``Config`` need no plugin-specific
entry point.

RecBole's own models, fixed here (:mod:`recbole_llm.patches` installs the bodies):

- ``Pop.calculate_loss`` counts with ``item_cnt[item] = item_cnt[item] + 1``, which adds one per *distinct*
  item of a batch (an item's count becomes the number of batches it appears in), and counts the random
  negatives that pointwise sampling (RecBole's default for Pop) puts in the same item column: Pop ranked by
  a shuffle-, batch-size- and seed-dependent count. Every real training interaction now counts once (with
  or without negative sampling, whatever a rating ``threshold`` labels it), sampled negatives not, and the
  counts of DDP ranks are summed, so every rank holds the whole count.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import pkgutil
from pathlib import Path
from typing import Callable

# The model table lives in a leaf module (imported by the checkpoint loader too).
from recbole_llm.model.catalog import (
    PLUGIN_MODELS,
    available_models,
    get_plugin_model,
    module_source,
    recbole_models,
    third_party_imports,
)
from recbole_llm.errors import RecboleLLMError
from recbole_llm.settings import properties_dir

# Read for every model, RecBole's included, right after RecBole's overall.yaml: the plugin-wide keys.
OVERALL_YAML = "overall.yaml"
# Read for every plugin model before its own YAML: the plugin trainer's keys.
TRAINER_YAML = "PluginTrainer.yaml"


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


def _missing_packages(module_name: str, error: ModuleNotFoundError) -> list[str]:
    """Packages a RecBole model needs that are not installed: the one that failed to import and any other
    top-level import of the model's module that is absent (XGBoost: its package imports lightgbm first)."""
    missing = {(error.name or "").split(".")[0]} - {"", "recbole"}
    package, _, module = module_name.rpartition(".")
    spec = importlib.util.find_spec(package)  # imports recbole.model, not the package that failed
    if spec is not None and spec.submodule_search_locations:
        for info in pkgutil.iter_modules(spec.submodule_search_locations):
            if info.name == module:
                missing |= {name for name in third_party_imports(module_source(info))
                            if importlib.util.find_spec(name) is None}
    return sorted(missing)


def _unknown_model(model_name: str) -> RecboleLLMError:
    names = available_models()
    same_but_case = [name for name in names if name.lower() == model_name.lower()]
    close = same_but_case or difflib.get_close_matches(model_name, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return RecboleLLMError(f"unknown model '{model_name}'.{hint} Available models: {', '.join(names)}")


def wrap_get_model(recbole_get_model: Callable[[str], type]) -> Callable[[str], type]:
    """``get_model``: the plugin's models first; an unknown name or a missing optional package in one line."""

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

    return get_model


def wrap_get_trainer(recbole_get_trainer: Callable) -> Callable:
    """``get_trainer``: the plugin trainer for plugin models, RecBole's choice for RecBole's."""

    @functools.wraps(recbole_get_trainer)
    def get_trainer(model_type, model_name):
        if model_name in PLUGIN_MODELS:
            from recbole_llm.training.trainer import PluginTrainer

            return PluginTrainer
        return recbole_get_trainer(model_type, model_name)

    return get_trainer


def wrap_update_internal_config_dict(original: Callable) -> Callable:
    """Read the plugin's property files exactly where RecBole reads its own models' YAML.

    RecBole's ``Config._load_internal_config_dict`` reads overall.yaml, then the model's YAML, then the
    dataset and quick-start YAMLs, then the user's files, dicts and command line. Right after RecBole's
    overall.yaml come the plugin's overall.yaml (every model) and a plugin model's YAMLs, which gives them
    the same precedence as a built-in model's YAML.
    """
    from recbole.config import configurator

    recbole_overall = os.path.realpath(
        os.path.join(os.path.dirname(configurator.__file__), "../properties/overall.yaml")
    )

    @functools.wraps(original)
    def _update_internal_config_dict(self, file):
        config_dict = original(self, file)
        if os.path.realpath(file) == recbole_overall:
            plugin_yamls = [properties_dir() / OVERALL_YAML, *plugin_model_yamls(getattr(self, "model", None) or "")]
            for plugin_yaml in plugin_yamls:
                original(self, str(plugin_yaml))
        return config_dict

    return _update_internal_config_dict


def wrap_get_flops(recbole_get_flops: Callable) -> Callable:
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

    return get_flops


# ---------------------------------------------------------------------------------------------------
# RecBole's Pop: every real training interaction counted once, summed over DDP ranks


def wrap_pop_init(original):
    """RecBole's ``Pop.__init__``, keeping the label field's name when training batches carry sampled
    negatives (label 0) there: with negative sampling on, RecBole labels every real interaction 1."""

    @functools.wraps(original)
    def __init__(self, config, dataset):
        original(self, config, dataset)
        sampled = (config["train_neg_sample_args"] or {}).get("distribution", "none") != "none"
        self.LABEL = config["LABEL_FIELD"] if sampled else None

    return __init__


def pop_calculate_loss(self, interaction):
    """RecBole's Pop, counting each real training interaction of the batch once (``index_add_`` sums
    duplicates; sampled negatives, label 0 when negative sampling is on, add nothing). Under DDP the ranks'
    counts are summed (``all_reduce``), so each rank ranks by the whole training split's counts; the few rows
    ``DistributedSampler`` repeats to even out the ranks are counted twice.

    ``item_cnt`` is ``[n_items, 1]`` int64; ``max_cnt`` its maximum, as RecBole's Pop keeps them. Returns
    RecBole's zero loss (Pop has nothing to train)."""
    import torch
    import torch.distributed as dist

    item = interaction[self.ITEM_ID].to(self.item_cnt.device)
    label = getattr(self, "LABEL", None)
    if label is not None and label in interaction.interaction:
        item = item[interaction[label].to(item.device) > 0]
    increment = torch.zeros_like(self.item_cnt)
    increment.index_add_(0, item, torch.ones(len(item), 1, dtype=increment.dtype, device=increment.device))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(increment)
    self.item_cnt += increment
    self.max_cnt = torch.max(self.item_cnt, dim=0)[0]
    return torch.nn.Parameter(torch.zeros(1)).to(self.device)
