"""RecBole 1.2.1 on today's stack: the fixes that pins in pyproject.toml cannot make.

What a pin answers (see pyproject.toml), because no fix short of copying RecBole's code exists: pandas 3.
Its copy-on-write makes RecBole's chained ``feat[field].fillna(..., inplace=True)`` silent no-ops, and its
``Series.agg(len)`` returns the column's length where ``Dataset._remap`` needs each sequence's.

What this module fixes, each by wrapping a RecBole function rather than copying it (the bodies are here;
:mod:`recbole_llm.patches` installs them, each naming the RecBole line it answers):

- ``recbole/quick_start/quick_start.py`` imports ray at module level (``from ray import tune``, used only
  by ``objective_function``'s ``tune.report``), and RecBole 1.2.1 pins ray<=2.6.3, which has no wheels for
  Python >= 3.12, needs ``pkg_resources`` (gone in setuptools 81) and ``np.bool8`` (gone in numpy 2).
  ray becomes optional: where it does not import, quick_start gets a stand-in ``tune`` whose use says
  that ray-based hyper-parameter search needs ray; everything else works.
- ``Config.compatibility_settings`` assigns ``np.float = np.float_`` and friends; numpy 2 removed
  ``np.float_``, ``np.complex_`` and ``np.unicode_``, so every ``Config()`` fails. It becomes a version
  that adds only the aliases numpy lacks (RecBole's metrics and samplers still use ``np.float``).
- RecBole's ``ensure_dir`` checks, then creates: two DDP ranks creating ``checkpoint_dir`` (or the log
  folder) at once fail with ``FileExistsError``. It becomes ``os.makedirs(..., exist_ok=True)``.
- RecBole's metrics return numpy scalars; numpy 2 prints them as ``np.float64(0.05)``, so the result
  dicts RecBole logs stop being plain Python literals. ``Evaluator.evaluate`` returns Python floats.
- torch >= 2.6 refuses RecBole's checkpoints: :mod:`recbole_llm.checkpoint.loading` loads them through an
  allow-list instead.
- ``recbole/model/sequential_recommender/sine.py`` switches autograd anomaly detection on at import, for
  every model. The config key ``detect_anomaly`` (default False) decides, for RecBole's models too.
- With ``loss_type: CE`` RecBole requires ``train_neg_sample_args: ~`` but its own overall.yaml sets a
  uniform sampler, so the default SASRec config fails. A CE model whose user did not ask for negative
  sampling gets none.
- RecBole's metrics use ``np.float`` and friends, which only ``Config.__init__`` recreates; a process that
  unpickles a Config (``load_data_and_model``) never runs it. RecBole's own aliasing runs at import.
- A dataset that is not on disk makes RecBole prompt for a download on standard input, which hangs
  offline and in CI. It becomes a one-line error saying where RecBole looked.
- RecBole on this stack prints warnings that are not the user's business; they are filtered by message.
- ``Dataset._dataframe_to_interaction`` turns the time field into float32 before histories are sorted by it:
  Unix seconds round to 128 s, so close events kept file-row order (RUCAIBox/RecBole#2204). It stays float64.
- Sampled evaluation (``eval_args`` mode ``uniN`` / ``popN``) drew new negatives at every evaluation
  (RUCAIBox/RecBole#2077): each evaluation batch now draws from a generator seeded by the config's seed.
- ``Pop.calculate_loss`` counts with ``item_cnt[item] = item_cnt[item] + 1``, which adds one per *distinct*
  item of a batch (an item's count becomes the number of batches it appears in), and counts the random
  negatives that pointwise sampling (RecBole's default for Pop) puts in the same item column: Pop ranked by
  a shuffle-, batch-size- and seed-dependent count. Every real training interaction now counts once (with
  or without negative sampling, whatever a rating ``threshold`` labels it), sampled negatives not, and the
  counts of DDP ranks are summed, so every rank holds the whole count.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import Any

from recbole_llm.errors import RecboleLLMError

# Warnings from RecBole's dependencies that say nothing the user can act on. Matched by message so that
# real warnings from the same modules still show.
_NOISE = (
    (DeprecationWarning, r"pkg_resources is deprecated"),
    (DeprecationWarning, r"Deprecated call to `pkg_resources"),
    (UserWarning, r"pkg_resources is deprecated"),
    (FutureWarning, r"A value is trying to be set on a copy of a DataFrame or Series"),
    (FutureWarning, r"ChainedAssignmentError"),
    (FutureWarning, r"using <built-in function len> in Series\.agg cannot aggregate"),
    (FutureWarning, r"`torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated"),
    (FutureWarning, r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated"),
    (UserWarning, r"torch\.cuda\.amp\.GradScaler is enabled, but CUDA is not available"),
    (UserWarning, r"Anomaly Detection has been enabled"),
    (DeprecationWarning, r"`np\.bool8` is a deprecated alias"),
    (DeprecationWarning, r"`tune\.report` and `tune\.checkpoint_dir` APIs are deprecated"),
    (DeprecationWarning, r"distutils Version classes are deprecated"),
)


# The numpy aliases RecBole 1.2.1 (Config.compatibility_settings) and ray 2.6.3 use, added only where
# numpy lacks them: numpy 2 removed np.float_, np.complex_, np.unicode_ and np.bool8.
_NUMPY_ALIASES = {
    "bool": "bool_", "int": "int_", "float": "float64", "complex": "complex128", "object": "object_",
    "str": "str_", "long": "int_", "unicode": "str_", "bool8": "bool_", "float_": "float64",
    "complex_": "complex128", "unicode_": "str_",
}


def numpy_aliases() -> None:
    """Add the numpy aliases RecBole 1.2.1 and ray 2.6.3 use, without overriding any numpy defines."""
    import numpy as np

    for alias, target in _NUMPY_ALIASES.items():
        if alias not in np.__dict__:  # np.__dict__, not hasattr: numpy 2's __getattr__ raises for these
            setattr(np, alias, getattr(np, target))


class _RayMissing:
    """Stands in for ``ray.tune`` in RecBole's quick_start when ray cannot be imported.

    ``report`` does what ray's does outside a ray session, nothing, so ``objective_function`` (and RecBole's
    hyperopt-based ``HyperTuning``) still works; anything else says that it needs ray.
    """

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def report(self, *args, **kwargs) -> None:
        return None

    def __getattr__(self, name: str):
        raise RecboleLLMError(
            f"ray-based hyper-parameter search needs ray, which cannot be imported here ({self._reason}); "
            "on Python 3.11: pip install 'ray==2.6.3' 'setuptools<81'"
        )


def import_quick_start() -> None:
    """Import ``recbole.quick_start``, with ray if ray imports and with a stand-in ``tune`` if not.

    The stand-in lives in ``sys.modules`` only while quick_start imports, so other libraries that probe
    for ray (transformers, peft) still see that it is absent.
    """
    import sys
    import types

    if "recbole.quick_start.quick_start" in sys.modules:
        return
    numpy_aliases()
    try:
        import ray.tune  # noqa: F401
    except Exception as error:  # ImportError, or ray 2.6.3 failing on numpy 2 / setuptools >= 81
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:160]
        saved = {name: sys.modules.get(name) for name in ("ray", "ray.tune")}
        stand_in = types.ModuleType("ray")
        stand_in.tune = _RayMissing(reason)
        sys.modules["ray"] = stand_in
        sys.modules["ray.tune"] = stand_in.tune  # type: ignore[assignment]
        try:
            import recbole.quick_start  # noqa: F401
        finally:
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
    else:
        import recbole.quick_start  # noqa: F401


def silence_stack_noise() -> None:
    for category, message in _NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


def _quiet_ray_session_log() -> None:
    # objective_function calls ray.tune.report outside a tuner; ray's get_session logs "Session not
    # detected" and a stack trace at WARNING level on its own logger.
    class _DropSessionNotDetected(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return record.funcName != "get_session"

    logging.getLogger("ray.tune.trainable.session").addFilter(_DropSessionNotDetected())


# ---------------------------------------------------------------------------------------------------
# Config


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


def _check_yaml_file(path: str, loader) -> None:
    """A config file that cannot be read, does not parse or is not a mapping: one line naming file and line."""
    import yaml

    try:
        with open(path, "r", encoding="utf-8") as f:
            parsed = yaml.load(f.read(), Loader=loader)
    except FileNotFoundError:
        raise RecboleLLMError(f"config file '{path}' does not exist: check config_file_list / --config_files") from None
    except UnicodeDecodeError as error:
        raise RecboleLLMError(f"config file '{path}' is not UTF-8 text (byte {error.start}): save it as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecboleLLMError(f"config file '{path}' is not valid YAML{where}: {problem}; fix the YAML") from None
    if parsed is not None and not isinstance(parsed, dict):
        raise RecboleLLMError(
            f"config file '{path}' holds a {type(parsed).__name__}, not a mapping of settings: "
            "write one 'key: value' per line"
        )


_POSITIVE_INTS = ("epochs", "train_batch_size", "eval_batch_size", "stopping_step")
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
        raise RecboleLLMError(f"metrics={metrics!r} must be a list of metric names: e.g. --metrics=\"['Recall','NDCG']\"")
    known = sorted(metric_types)
    for name in names:
        if name.lower() not in metric_types:
            raise RecboleLLMError(f"metrics: unknown metric '{name}'; use names from: {', '.join(known)} "
                                  "(any case)")
    valid = final.get("valid_metric")
    if valid is not None and str(valid).partition("@")[0].lower() not in metric_types:
        # Whether it is among ``metrics`` (and its @k among ``topk``) is left to RecBole: evaluating a checkpoint
        # with other metrics never reads valid_metric.
        raise RecboleLLMError(f"valid_metric={valid!r} names no metric; use one of metrics at one of topk, e.g. "
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
        raise RecboleLLMError(
            f"eval_args order {order!r} is not supported by sequential models, which read every history in time "
            "order (RecBole's SequentialDataset): use order: TO, or leave order out"
        )


def check_config_values(final: dict, model: str | None = None) -> None:
    """Values every run depends on, checked before RecBole reads any data: one line naming key and fix.
    ``model``: the model's name where ``final`` does not hold it yet (Config fills it in later)."""
    from recbole.utils import ModelType

    def positive_int(key: str) -> None:
        value = final.get(key)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RecboleLLMError(f"{key}={value!r} must be a positive integer: set --{key}=N with N >= 1")

    for key in _POSITIVE_INTS:
        positive_int(key)
    length = final.get("MAX_ITEM_LIST_LENGTH")
    from recbole_llm.model.catalog import PLUGIN_MODELS

    if ((model or final.get("model")) in PLUGIN_MODELS and final.get("pretrained_model_name_or_path") is None
            and isinstance(length, int) and length > RANDOM_ENCODER_POSITIONS):
        raise RecboleLLMError(
            f"MAX_ITEM_LIST_LENGTH={length} exceeds the {RANDOM_ENCODER_POSITIONS} positions of the random "
            f"encoder (pretrained_model_name_or_path: null); set MAX_ITEM_LIST_LENGTH to at most "
            f"{RANDOM_ENCODER_POSITIONS}"
        )
    topk = final.get("topk")
    for k in topk if isinstance(topk, list) else [topk]:
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise RecboleLLMError(f"topk={topk!r} must be a positive integer or a list of them: e.g. --topk=[10]")
    rate = final.get("learning_rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0):
        raise RecboleLLMError(f"learning_rate={rate!r} must be a number above 0: e.g. --learning_rate=0.001")
    decay = final.get("weight_decay")
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay >= 0):
        raise RecboleLLMError(f"weight_decay={decay!r} must be a number of 0 or more: e.g. --weight_decay=0.0001")
    seed = final.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
        raise RecboleLLMError(f"seed={seed!r} must be an integer from 0 to 2**32 - 1: e.g. --seed=2020")
    _metric_names(final)
    if final.get("MODEL_TYPE") == ModelType.SEQUENTIAL:
        positive_int("MAX_ITEM_LIST_LENGTH")
        _sequential_order(final)
        loss = final.get("loss_type")
        if loss is not None and loss not in _SEQUENTIAL_LOSSES:
            raise RecboleLLMError(
                f"loss_type={loss!r} is not a loss of sequential models: use {' or '.join(_SEQUENTIAL_LOSSES)}"
            )


def wrap_set_default_parameters(original):
    """``Config._set_default_parameters``: CE without negative sampling, values checked, encoder limits."""
    from recbole.utils import ModelType

    from recbole_llm.model.catalog import PLUGIN_MODELS

    @functools.wraps(original)
    def _set_default_parameters(self):
        final = self.final_config_dict
        user_set_sampling = "train_neg_sample_args" in self.external_config_dict
        if (
            final.get("loss_type") == "CE"
            and final.get("MODEL_TYPE") == ModelType.SEQUENTIAL
            and not user_set_sampling
        ):
            final["train_neg_sample_args"] = None
        check_config_values(final, self.model)
        if self.model in PLUGIN_MODELS:  # the encoder's limits, before RecBole builds data at these lengths
            from recbole_llm.model.backbone import check_encoder_settings
            from recbole_llm.model.item_text import anchor_settings

            from recbole_llm.training.windows import training_rows

            check_encoder_settings(final)
            anchor_settings(final)
            training_rows(final)  # the dataset cuts its training rows by these once the data is loaded
        original(self)

    return _set_default_parameters


def wrap_init_device(original):
    """``Config._init_device``: the gloo backend for CPU processes, and anomaly detection as configured."""
    import torch

    from recbole_llm.training import distributed

    @functools.wraps(original)
    def _init_device(self):
        if not distributed.init_gloo_device(self.final_config_dict):
            original(self)  # one process, or RecBole's own nccl set-up
        # RecBole's sine.py turned this on at import; it costs a quarter of the wall time for nothing.
        torch.autograd.set_detect_anomaly(bool(self.final_config_dict.get("detect_anomaly")))

    return _init_device


def compatibility_settings(self) -> None:
    """``Config.compatibility_settings`` without numpy 2's missing aliases: only those numpy lacks."""
    numpy_aliases()


def wrap_load_config_files(original):
    """``Config._load_config_files``: a file that does not read or parse, in one line naming file and line."""

    @functools.wraps(original)
    def _load_config_files(self, file_list):
        for file in file_list or []:
            _check_yaml_file(file, self.yaml_loader)
        return original(self, file_list)

    return _load_config_files


def wrap_load_variable_config_dict(original):
    """``Config._load_variable_config_dict``: ``config_dict`` values as plain Python (:func:`plain_values`)."""

    @functools.wraps(original)
    def _load_variable_config_dict(self, config_dict):
        return original(self, plain_values(config_dict) if config_dict else config_dict)

    return _load_variable_config_dict


def wrap_download(original):
    """``Dataset._download``: a dataset not on disk is a one-line error, not a prompt on standard input."""

    @functools.wraps(original)
    def _download(self):
        name, path = self.dataset_name, os.path.abspath(self.dataset_path)
        if self.config["allow_download"] and self._get_download_url("url", allow_none=True):
            return original(self)
        known = self._get_download_url("url", allow_none=True) is not None
        fix = (
            f"put RecBole atomic files ({name}.inter, ...) in '{path}' or set data_path to the folder "
            f"that holds '{name}/'"
        )
        if known:
            fix += " (RecBole can download it: set allow_download=True)"
        raise RecboleLLMError(f"dataset '{name}' not found: no folder '{path}'; {fix}")

    return _download


def ensure_dir(dir_path) -> None:
    """RecBole's ``ensure_dir`` without its check-then-create race between DDP ranks."""
    os.makedirs(dir_path, exist_ok=True)


_TYPES = "token, token_seq, float, float_seq"


def _atomic_header(path: str, separator: str, encoding: str) -> list[tuple[str, str]]:
    """The ``name:type`` fields of a RecBole atomic file's header, or a one-line error naming the fix."""
    from recbole.utils import FeatureType

    encoding = encoding or "utf-8"
    with open(path, "rb") as f:
        first = f.readline()
        has_rows = any(line.strip() for line in (f.readline(), f.readline()))
    try:
        head = first.decode(encoding).lstrip("\ufeff").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise RecboleLLMError(f"{path}: line 1 is not {encoding} text (byte {error.start}): save the file as "
                              f"{encoding} or set encoding") from None
    if not head.strip():
        raise RecboleLLMError(f"{path} is empty: its first line must name the fields as name:type ({_TYPES}), "
                              "one row per line after it")
    fields = []
    for column, field_type in enumerate(head.split(separator), start=1):
        name, colon, kind = field_type.partition(":")
        if not colon:
            raise RecboleLLMError(f"{path}: header field {column} '{field_type}' has no type: write "
                                  f"'{field_type}:token' (types: {_TYPES})")
        if kind not in {t.value for t in FeatureType}:
            raise RecboleLLMError(f"{path}: header field '{field_type}' has the unknown type '{kind}': use one of "
                                  f"{_TYPES}")
        earlier = next((number for number, (seen, _) in enumerate(fields, start=1) if seen == name), None)
        if earlier is not None:
            raise RecboleLLMError(f"{path}: the header names '{name}' twice (fields {earlier} and {column}): rename "
                                  "or remove one of the columns")
        fields.append((name, kind))
    if not has_rows:
        raise RecboleLLMError(f"{path} has a header but no rows: add the data, one row per line")
    return fields


def _field_limit() -> int:
    import csv

    return csv.field_size_limit()


def _locate_bad_row(path: str, separator: str, encoding: str, fields: list[tuple[str, str]]) -> str:
    """Where a file RecBole could not read goes wrong: the first undecodable line, field longer than the CSV
    reader takes (RecBole reads with pandas' python engine: Python's ``csv`` module and its field limit),
    unclosed quote or non-number."""
    encoding = encoding or "utf-8"
    limit = _field_limit()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode(encoding).rstrip("\r\n")
            except UnicodeDecodeError as error:
                return f"line {number} is not {encoding} text (byte {error.start} of the line): save it as {encoding}"
            if number == 1:
                continue
            values = line.split(separator)
            for (name, _), value in zip(fields, values):
                if len(value) > limit:
                    return (f"line {number}, field '{name}' is {len(value):,} characters long, over the {limit:,} "
                            "the reader takes: shorten it (or leave the column out with load_col)")
                if value.startswith('"') and (len(value) < 2 or not value.endswith('"')):  # quoted, not closed
                    return (f"line {number}, field '{name}' has an unclosed quote (\"), which makes the reader take "
                            "the lines after it as one field: remove the quote or double it (\"\")")
            for (name, kind), value in zip(fields, values):
                if kind == "float" and value.strip():
                    try:
                        float(value)
                    except ValueError:
                        return f"line {number}, field '{name}' (float): {value[:40]!r} is not a number"
    return ""


def _orders_by_time(dataset, source) -> bool:
    """Whether RecBole orders this interaction file's histories by time (sequential models, order TO)."""
    from recbole.utils import FeatureSource, ModelType

    eval_args = dataset.config["eval_args"] or {}
    if dataset.config["benchmark_filename"]:  # pre-split files hold each history as an ordered item list
        return False
    return (
        source in (FeatureSource.INTERACTION, FeatureSource.INTERACTION.value)
        and bool(dataset.time_field)
        and dataset.config["MODEL_TYPE"] == ModelType.SEQUENTIAL
        and (eval_args.get("order") or "TO") == "TO"
    )


def wrap_load_feat(original):
    """``Dataset._load_feat``: an atomic file's header, id fields and bad rows in one line naming the fix."""
    from recbole.utils import FeatureSource

    @functools.wraps(original)
    def _load_feat(self, filepath, source):
        load_col, _ = self._get_load_and_unload_col(source)
        if load_col == set():  # RecBole does not read this file
            return original(self, filepath, source)
        separator, encoding = self.config["field_separator"], self.config["encoding"]
        fields = _atomic_header(filepath, separator, encoding)
        names = {name for name, _ in fields}
        needed = {
            FeatureSource.INTERACTION: [("USER_ID_FIELD", self.uid_field), ("ITEM_ID_FIELD", self.iid_field)],
            FeatureSource.USER: [("USER_ID_FIELD", self.uid_field)],
            FeatureSource.ITEM: [("ITEM_ID_FIELD", self.iid_field)],
        }.get(source, [])
        for key, field in needed:
            if field and field not in names:
                raise RecboleLLMError(f"{filepath} has no '{field}' field: add a '{field}:token' column, or set "
                                      f"{key} to the name of your id field")
        if _orders_by_time(self, source) and self.time_field not in names:
            raise RecboleLLMError(
                f"{filepath} has no '{self.time_field}' field, which sequential models order each history by: "
                f"add a '{self.time_field}:float' column (the position in the user's history will do), or set "
                "TIME_FIELD to yours"
            )
        with open(filepath, "rb") as f:
            bom = f.read(3) == b"\xef\xbb\xbf"
        if bom and str(encoding or "utf-8").lower().replace("_", "-") in ("utf-8", "utf8"):
            # a UTF-8 byte-order mark (Excel, Notepad) would become part of the first field's name
            self.config["encoding"] = "utf-8-sig"
        try:
            return original(self, filepath, source)
        except (ValueError, UnicodeDecodeError):
            where = _locate_bad_row(filepath, separator, encoding, fields)
            if not where:
                raise
            raise RecboleLLMError(f"{filepath}: {where}") from None
        finally:
            self.config["encoding"] = encoding

    return _load_feat


def wrap_dataframe_to_interaction(original):
    """``Dataset._dataframe_to_interaction`` keeps the time field at float64.

    RecBole reads every ``float`` field at float64 and converts it to ``torch.FloatTensor`` (float32, 24
    significant bits) here, before ``Dataset.build`` and ``SequentialDataset.data_augmentation`` sort each
    history by it: Unix seconds (about 1.7e9) are then rounded to multiples of 128 s, and events closer than
    that fall back to file-row order (RUCAIBox/RecBole#2204). The time field becomes a float64 tensor (exact
    for integers up to 2**53: seconds, milliseconds and microseconds since 1970); the other float fields stay
    as RecBole makes them.
    """
    import numpy as np
    import torch
    from recbole.utils import FeatureType

    @functools.wraps(original)
    def _dataframe_to_interaction(self, data):
        interaction = original(self, data)
        field = self.time_field
        if field and field in data and self.field2type.get(field) == FeatureType.FLOAT and \
                field not in (self.config["numerical_features"] or []):
            interaction.interaction[field] = torch.from_numpy(np.asarray(data[field].values, dtype=np.float64))
        return interaction

    return _dataframe_to_interaction


def wrap_get_load_and_unload_col(original):
    """``Dataset._get_load_and_unload_col``: a sequential model's time field is loaded even where ``load_col``
    leaves it out."""

    @functools.wraps(original)
    def _get_load_and_unload_col(self, source):
        load_col, unload_col = original(self, source)
        if load_col and _orders_by_time(self, source):
            load_col = set(load_col) | {self.time_field}
        return load_col, unload_col

    return _get_load_and_unload_col


def wrap_create_dataset(original):
    """``create_dataset`` records (or, for a checkpoint's Config, checks) the data's world, and unpickles no
    saved dataset the user did not name.

    RecBole 1.2.1 loads ``<checkpoint_dir>/<dataset>-<Class>.pth`` with plain ``pickle.load`` whenever such
    a file exists: a file dropped there runs code. Only ``dataset_save_path``, a file a user set and wrote
    themselves, is loaded.
    """
    from recbole_llm.checkpoint import lineage as world

    @functools.wraps(original)
    def create_dataset(config):
        final = config.final_config_dict
        named = final.get("dataset_save_path")
        if not named:  # RecBole would load its default file if one exists: point it at none
            final["dataset_save_path"] = os.path.join(final["checkpoint_dir"], ".recbole_llm-no-saved-dataset")
        try:
            dataset = original(config)
        finally:
            final["dataset_save_path"] = named
        trained = world.stored(config)
        if trained is not None:  # a checkpoint's Config: the data must be the one it was trained on
            world.check(trained, dataset)
        else:
            world.record(config, dataset)
        return dataset

    return create_dataset


# Plugin config keys that decide the training rows (recbole_llm.training.dataset): saved dataloaders built with other
# values hold other rows, which RecBole's own comparison (its dataset_arguments, seed, eval_args) misses.
TRAINING_ROW_KEYS = ("train_positions", "train_window_stride")


def wrap_load_split_dataloaders(original):
    """``load_split_dataloaders`` unpickles only the file ``dataloaders_save_path`` names, never RecBole's
    default ``<checkpoint_dir>/<dataset>-for-<model>-dataloader.pth`` (a file dropped there would run code),
    and rebuilds the loaders (returns None, as RecBole does for its own keys) when they were saved with other
    :data:`TRAINING_ROW_KEYS` values: a model scoring the last N positions of rows cut every M != N targets
    would train on a fraction of the targets, or some twice, with no error."""

    @functools.wraps(original)
    def load_split_dataloaders(config):
        if not config["dataloaders_save_path"]:
            return None
        loaders = original(config)
        # the dataset's Config: RecBole has already given the loaders the current one (update_config)
        built_with = loaders[0]._dataset.config if loaders is not None else None
        if loaders is not None and any(config[key] != built_with[key] for key in TRAINING_ROW_KEYS):
            return None
        return loaders

    return load_split_dataloaders


def wrap_save_split_dataloaders(original):
    """``save_split_dataloaders`` leaves the run's shuffling as it was.

    RecBole sets each loader's generator to None to pickle it and never puts it back: the run that saves
    then shuffles from the global RNG and its numbers differ from the same run without saving.
    """

    @functools.wraps(original)
    def save_split_dataloaders(config, dataloaders):
        generators = [(loader, loader.generator, getattr(loader.sampler, "generator", None))
                      for loader in dataloaders]
        try:
            return original(config, dataloaders)
        finally:
            for loader, generator, sampler_generator in generators:
                loader.generator, loader.sampler.generator = generator, sampler_generator

    return save_split_dataloaders


_PHASES = {"valid": 1, "test": 2}


def wrap_eval_collate_fn(original):
    """``NegSampleEvalDataLoader.collate_fn`` draws each batch's negatives from its own seeded generator.

    RecBole's samplers draw from numpy's global generator, so with ``eval_args`` mode ``uniN`` / ``popN`` every
    evaluation ranks the target against other negatives (RUCAIBox/RecBole#2077): one checkpoint scored
    differently in the run, in ``recbole-llm evaluate`` and in each repeated evaluation. Each batch now draws
    from ``SeedSequence([seed, phase, first row, rows])``: the same checkpoint, seed and ``eval_batch_size``
    give the same negatives and figures wherever and however often it is evaluated (with ``worker`` > 0 too),
    and evaluating no longer moves the global generator that training's own sampling continues from.
    """
    import numpy as np

    @functools.wraps(original)
    def collate_fn(self, index):
        seed = self.config["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or len(index) == 0:
            return original(self, index)
        phase = getattr(self._sampler, "phase", None) or "test"
        words = [seed % 2**32, _PHASES.get(phase, 0), int(index[0]), len(index)]
        saved = np.random.get_state()
        np.random.seed(np.random.SeedSequence(words).generate_state(1)[0])
        try:
            return original(self, index)
        finally:
            np.random.set_state(saved)

    return collate_fn


def wrap_evaluator_evaluate(original):
    """``Evaluator.evaluate`` returns Python floats: numpy 2 prints numpy scalars as ``np.float64(0.05)``."""

    @functools.wraps(original)
    def evaluate(self, dataobject):
        import numpy as np

        result = original(self, dataobject)
        for key, value in result.items():
            if isinstance(value, np.generic):
                result[key] = value.item()
        return result

    return evaluate


def quiet_stack() -> None:
    """Warnings and log records of RecBole's dependencies that say nothing the user can act on, silenced."""
    silence_stack_noise()
    _quiet_ray_session_log()


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
