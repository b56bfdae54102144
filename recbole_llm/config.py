"""The checks of a run's Config values: what every run depends on, checked before RecBole reads any data,
each failing in one line naming key and fix; and ``config_dict`` values as plain Python (:func:`plain_values`).

:mod:`recbole_llm.patches.config` runs them as RecBole builds a ``Config``; the checkpoint loader
(:mod:`recbole_llm.checkpoint.checks`) runs them on a checkpoint's Config. This module imports nothing of
:mod:`recbole_llm.patches` (which sits above the checkpoint loader), and neither torch nor RecBole at import.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from recbole_llm.errors import ConfigError


def plain_values(value: Any) -> Any:
    """``config_dict`` values as plain Python: paths as str, numpy scalars and arrays as numbers and lists,
    tuples as lists (as YAML would give them; RecBole rejects a tuple ``topk``) except ``gpu_id``, which
    RecBole reads as a tuple of devices.

    A script naturally passes ``Path`` objects and numpy numbers; pickled into a checkpoint's Config they
    would name globals the checkpoint allow-list rightly refuses, leaving the run's own checkpoint
    unloadable (and RecBole's string handling of paths breaks on ``Path``).
    """
    import numpy as np

    if isinstance(value, dict):
        return {key: item if key == "gpu_id" else plain_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_values(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


_POSITIVE_INTS = ("epochs", "train_batch_size", "eval_batch_size", "stopping_step")
# null is no value for these (RecBole compares them with numbers)
_REQUIRED_INTS = ("MAX_ITEM_LIST_LENGTH",)
_SEQUENTIAL_LOSSES = ("CE", "BPR")
# The longest history a randomly initialised encoder (pretrained_model_name_or_path: null) takes: BERT's
# position table, as in every pretrained BERT the plugin loads. RecBole builds its prefix rows at
# MAX_ITEM_LIST_LENGTH before any model exists (100,000 on ml-100k asked for 79 GB).
RANDOM_ENCODER_POSITIONS = 512


def _metric_names(final: dict) -> None:
    """``metrics`` and ``valid_metric`` name metrics RecBole (or the plugin) knows."""
    from recbole.evaluator import metric_types

    metrics = final.get("metrics")
    names = [metrics] if isinstance(metrics, str) else metrics
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"metrics={metrics!r} must be a list of metric names: e.g. --metrics=\"['Recall','NDCG']\"")
    known = sorted(metric_types)
    for name in names:
        if name.lower() not in metric_types:
            raise ConfigError(f"metrics: unknown metric '{name}'; use names from: {', '.join(known)} "
                                  "(any case)")
    valid = final.get("valid_metric")
    if valid is not None and str(valid).partition("@")[0].lower() not in metric_types:
        # Whether it is among ``metrics`` (and its @k among ``topk``) is left to RecBole: evaluating a checkpoint
        # with other metrics never reads valid_metric.
        raise ConfigError(f"valid_metric={valid!r} names no metric; use one of metrics at one of topk, e.g. "
                              "--valid_metric=NDCG@10")


def _sequential_order(final: dict) -> None:
    """Sequential models read each history in time order: RecBole's ``SequentialDataset.build`` refuses any
    ``eval_args`` order but TO, and ``Config`` fills an ``eval_args`` that leaves order out with RO (its
    overall default), so ``eval_args: {mode: uni100}`` failed. A missing order is TO; RO is one line."""
    eval_args = final.get("eval_args")
    if not isinstance(eval_args, dict):
        return  # RecBole's own check says it must be a dict
    order = eval_args.get("order")
    if order is None:
        final["eval_args"] = {**eval_args, "order": "TO"}
    elif order != "TO":
        raise ConfigError(
            f"eval_args order {order!r} is not supported by sequential models, which read every history in time "
            "order (RecBole's SequentialDataset): use order: TO, or leave order out"
        )


ALIAS_KEYS = ("alias_of_user_id", "alias_of_item_id", "alias_of_entity_id", "alias_of_relation_id")


def _alias_lists(final: dict) -> None:
    """``alias_of_*`` are lists of field names: RecBole adds them to a list (``dataset.py:527``), so a bare name
    failed in a traceback."""
    for key in ALIAS_KEYS:
        value = final.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{key}={value!r} must be a list of field names: e.g. {key}: [{key[9:]}_list]")


def _pre_split_item_lists(final: dict) -> None:
    """Pre-split files (``benchmark_filename``) hold each history as an ``item_id_list`` field, and RecBole maps
    every token field to ids of its own unless ``alias_of_item_id`` names it with the item field: the histories'
    ids would then name other items than the targets' ids, with no error. The list field must share them."""
    list_field = f"{final.get('ITEM_ID_FIELD') or 'item_id'}{final.get('LIST_SUFFIX') or '_list'}"
    if final.get("benchmark_filename") and list_field not in (final.get("alias_of_item_id") or []):
        raise ConfigError(
            f"benchmark_filename: the pre-split files' {list_field} must share the item ids, or RecBole numbers its "
            f"tokens apart from the items; set alias_of_item_id: [{list_field}]"
        )


def _booleans(final: dict, defaults: dict) -> None:
    """Keys whose default is true or false take only true or false: RecBole reads them by truth, so
    ``repeatable: "no"`` (or ``--repeatable=no``, which its command line keeps as a string) meant yes."""
    for key, default in defaults.items():
        value = final.get(key, default)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false: e.g. --{key}={not default} "
                              f"(True/False on the command line and in config_dict, true/false in YAML)")


def _pre_split_files(final: dict) -> None:
    """``benchmark_filename`` names the three pre-split files' suffixes, train, valid and test in that order:
    RecBole unpacks it into three, so a bare name was read letter by letter and two names failed in a traceback."""
    names = final.get("benchmark_filename")
    if names is not None and not (isinstance(names, list) and len(names) == 3
                                  and all(isinstance(name, str) and name for name in names)):
        raise ConfigError(f"benchmark_filename={names!r} must list the three pre-split files' suffixes, train, "
                          "valid and test in that order: e.g. benchmark_filename: [train, valid, test]")


def check_valid_metric(final: dict) -> None:
    """Training picks its best epoch by ``valid_metric``: it must be one of ``metrics``, at one of ``topk`` for
    a top-k metric, or RecBole fails with ``KeyError`` after the first epoch's training."""
    valid, metrics, topk = final.get("valid_metric"), final.get("metrics"), final.get("topk")
    if not isinstance(valid, str):
        return
    from recbole.evaluator.base_metric import TopkMetric
    from recbole.evaluator.register import metrics_dict

    name, at, k = valid.lower().partition("@")
    names = [metrics] if isinstance(metrics, str) else metrics or []
    ks = topk if isinstance(topk, list) else [topk]
    top_k = isinstance(metrics_dict.get(name), type) and issubclass(metrics_dict[name], TopkMetric)
    if name not in [str(metric).lower() for metric in names] or (at or top_k) and not (k.isdigit() and int(k) in ks):
        first = next((str(m) for m in names if issubclass(metrics_dict.get(str(m).lower(), object), TopkMetric)),
                     None)
        suggestion = f"{first}@{ks[0]}" if first and ks and ks[0] is not None else "NDCG@10 with NDCG in metrics"
        raise ConfigError(f"valid_metric={valid!r} is not among metrics={names!r} at topk={topk!r}, so training "
                          f"could not pick its best epoch: add it there, or set --valid_metric={suggestion}")


# Keys RecBole's launcher (recbole.quick_start.run) puts into config_dict itself, in no YAML file
_LAUNCH_KEYS = ("nproc", "world_size", "offset", "ip", "port", "local_rank", "single_spec", "config_files")


def misspelt_settings(given: Iterable[str], known: Iterable[str]) -> list[str]:
    """The ``given`` setting names no code reads (RecBole takes any key): raises ConfigError for one that is
    a close misspelling of a ``known`` key (``--epoch=2`` ran the default 300 epochs, ``--backbone_layer=1``
    all 6 layers, with no word), naming the key meant; returns the others, which may be a custom model's."""
    import difflib

    known = set(known) | set(_LAUNCH_KEYS)
    by_lower = {key.lower(): key for key in known}
    unknown = [key for key in given if key not in known]
    for key in unknown:
        match = difflib.get_close_matches(key.lower(), by_lower, n=1, cutoff=0.85)
        if match:
            raise ConfigError(f"unknown setting '{key}': did you mean '{by_lower[match[0]]}'? (RecBole takes any "
                              "key and would run without it)")
    return unknown


def check_config_values(final: dict, model: str | None = None, defaults: dict | None = None) -> None:
    """Values every run depends on, checked before RecBole reads any data: one line naming key and fix.
    ``model``: the model's name where ``final`` does not hold it yet (Config fills it in later);
    ``defaults``: the values before the user's (RecBole's and the plugin's YAML files, or a checkpoint's
    Config before overrides), whose true/false keys must stay true or false."""
    from recbole.utils import ModelType

    def positive_int(key: str) -> None:
        value = final.get(key)
        if value is None and key not in _REQUIRED_INTS:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value!r} must be a positive integer: set --{key}=N with N >= 1")

    if defaults:
        _booleans(final, defaults)

    for key in _POSITIVE_INTS:
        positive_int(key)
    length = final.get("MAX_ITEM_LIST_LENGTH")
    from recbole_llm.model.catalog import PLUGIN_MODELS

    if ((model or final.get("model")) in PLUGIN_MODELS and final.get("pretrained_model_name_or_path") is None
            and isinstance(length, int) and length > RANDOM_ENCODER_POSITIONS):
        raise ConfigError(
            f"MAX_ITEM_LIST_LENGTH={length} exceeds the {RANDOM_ENCODER_POSITIONS} positions of the random "
            f"encoder (pretrained_model_name_or_path: null); set MAX_ITEM_LIST_LENGTH to at most "
            f"{RANDOM_ENCODER_POSITIONS}"
        )
    topk = final.get("topk")
    for k in topk if isinstance(topk, list) else [topk]:
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"topk={topk!r} must be a positive integer or a list of them: e.g. --topk=[10]")
    rate = final.get("learning_rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0):
        raise ConfigError(f"learning_rate={rate!r} must be a number above 0: e.g. --learning_rate=0.001")
    decay = final.get("weight_decay")
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay >= 0):
        raise ConfigError(f"weight_decay={decay!r} must be a number of 0 or more: e.g. --weight_decay=0.0001")
    seed = final.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
        raise ConfigError(f"seed={seed!r} must be an integer from 0 to 2**32 - 1: e.g. --seed=2020")
    eval_args = final.get("eval_args")
    if eval_args is not None and not isinstance(eval_args, dict):
        raise ConfigError(f"eval_args={eval_args!r:.60} must be a mapping: e.g. "
                          "--eval_args=\"{'split': {'LS': 'valid_and_test'}, 'order': 'TO', 'mode': 'full'}\"")
    threshold = final.get("tail_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0):
        raise ConfigError(f"tail_threshold={threshold!r} must be an integer of 0 or more (a target with at most "
                          "this many training interactions is long-tail): e.g. --tail_threshold=20")
    _metric_names(final)
    _alias_lists(final)
    _pre_split_files(final)
    if final.get("MODEL_TYPE") == ModelType.SEQUENTIAL:
        positive_int("MAX_ITEM_LIST_LENGTH")
        _sequential_order(final)
        _pre_split_item_lists(final)
        loss = final.get("loss_type")
        if loss is not None and loss not in _SEQUENTIAL_LOSSES:
            raise ConfigError(
                f"loss_type={loss!r} is not a loss of sequential models: use {' or '.join(_SEQUENTIAL_LOSSES)}"
            )
