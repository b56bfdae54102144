"""The ``Config`` patch bodies: RecBole 1.2.1's Config with a run's values checked
(:mod:`recbole_llm.config`) before RecBole reads any data, each body wrapping a RecBole function
rather than copying it (:mod:`recbole_llm.patches` installs them, each naming the RecBole line it answers):

- ``recbole/model/sequential_recommender/sine.py`` switches autograd anomaly detection on at import, for
  every model. The config key ``detect_anomaly`` (default False) decides, for RecBole's models too.
- With ``loss_type: CE`` RecBole requires ``train_neg_sample_args: ~`` but its own overall.yaml sets a
  uniform sampler, so the default SASRec config fails. A CE model whose user did not ask for negative
  sampling gets none.
- A config file that cannot be read, does not parse or is not a mapping, and a value every run depends on
  that is wrong, fail in one line naming file, line or key and the fix; ``config_dict`` values become plain
  Python, which the checkpoint allow-list takes.
- RecBole takes any key: a close misspelling of a known one fails in one line, any other unknown key is
  named in a warning. A command-line value holding ``=`` is kept; a ``data_path`` holding ``ml-100k/`` is read
  (RecBole points ml-100k at its bundled copy whatever it says).

``Config.compatibility_settings`` (numpy 2's missing aliases) is :mod:`recbole_llm.patches.stack`.
"""

from __future__ import annotations

import functools
import os
import sys

from recbole_llm.errors import ConfigError
from recbole_llm.config import check_config_values, check_valid_metric, misspelt_settings, plain_values
from recbole_llm.patches import seen_items


def _check_yaml_file(path: str, loader) -> None:
    """A config file that cannot be read, does not parse or is not a mapping: one line naming file and line."""
    import yaml

    try:
        with open(path, "r", encoding="utf-8") as f:
            parsed = yaml.load(f.read(), Loader=loader)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist: check config_file_list / --config_files") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {error.start}): save it as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}; fix the YAML") from None
    if parsed is not None and not isinstance(parsed, dict):
        raise ConfigError(
            f"config file '{path}' holds a {type(parsed).__name__}, not a mapping of settings: "
            "write one 'key: value' per line"
        )


@functools.lru_cache(maxsize=1)
def every_yaml_key() -> frozenset[str]:
    """The keys of every RecBole and plugin property file (every model's, dataset's and quick-start's)."""
    from pathlib import Path

    import recbole
    import yaml

    from recbole_llm.settings import properties_dir

    keys: set[str] = set()
    for folder in (Path(recbole.__file__).parent / "properties", properties_dir()):
        for path in folder.rglob("*.yaml"):
            try:
                parsed = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                continue  # RecBole's own files; one that does not parse names no key
            keys |= set(parsed) if isinstance(parsed, dict) else set()
    return frozenset(keys)


def _check_setting_names(config) -> None:
    """Every setting the user gave is one some code reads: the YAML files' keys, RecBole's parameter lists,
    and for peft models every peft config field (BERTPEFT passes a method's own arguments through). A close
    misspelling is refused (:func:`misspelt_settings`); any other unknown key is named in a warning."""
    import logging

    # any model's keys too: one config file often serves several models (n_layers means nothing to GRU4Rec)
    known = set(config.internal_config_dict) | {key for keys in config.parameters.values() for key in keys}
    known |= every_yaml_key()
    if "peft_type" in config.internal_config_dict:
        import dataclasses

        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        known |= {field.name for kind in PEFT_TYPE_TO_CONFIG_MAPPING.values() for field in dataclasses.fields(kind)}
    unknown = misspelt_settings(config.external_config_dict, known)
    if unknown:
        logging.getLogger("recbole_llm").warning(
            "settings %s are in no RecBole, plugin or model YAML: read only if your own code reads them",
            ", ".join(unknown))


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
        _check_setting_names(self)
        check_config_values(final, self.model, self.internal_config_dict)
        check_valid_metric(final)  # a run's Config, not a checkpoint's: evaluating one never reads it
        if self.model in PLUGIN_MODELS:  # the encoder's limits, before RecBole builds data at these lengths
            from recbole_llm.model.backbone import check_encoder_settings
            from recbole_llm.model.item_text import anchor_settings, text_model

            from recbole_llm.model.positions import training_rows

            from recbole_llm.training.trainer import trainer_settings

            check_encoder_settings(final)
            trainer_settings(final)
            anchor_settings(final)
            text_model(final)
            training_rows(final)  # the dataset cuts its training rows by these once the data is loaded
        if final.get("init_from") is not None:  # before any data is read or log written: one line, exit 2
            from recbole_llm.checkpoint.init_from import check_init_from
            from recbole_llm.checkpoint.loading import load_for_comparison

            check_init_from(final, self.model, load_for_comparison)
        if "show_progress" not in self.external_config_dict and not sys.stderr.isatty():
            # RecBole's overall.yaml turns tqdm's bars on: redirected to a log they make one line of tens of
            # thousands of characters. Unless the user asked, bars show on a terminal only.
            final["show_progress"] = False
        with seen_items.not_repeatable_accepted(final):  # repeatable: False for sequential models too
            original(self)
        given = self.external_config_dict.get("data_path")
        if self.dataset == "ml-100k" and isinstance(given, str) and os.path.isdir(os.path.join(given, "ml-100k")):
            # RecBole points ml-100k at its bundled copy whatever data_path says: a user's own ml-100k is read
            final["data_path"] = os.path.join(given, "ml-100k")

    return _set_default_parameters


def wrap_load_cmd_line(original):
    """``Config._load_cmd_line``: a value holding ``=`` (``--checkpoint_dir=/data/day=1``) is read, split at
    the first ``=``; RecBole splits at every one and drops the setting with a warning the run scrolls past."""

    @functools.wraps(original)
    def _load_cmd_line(self):
        argv = sys.argv
        several = [arg for arg in argv[1:] if arg.startswith("--") and arg[2:].count("=") > 1]
        if not several or "ipykernel_launcher" in argv[0]:  # RecBole reads no command line in a notebook
            return original(self)
        sys.argv = [arg for arg in argv if arg not in several]
        try:
            values = original(self)
        finally:
            sys.argv = argv
        values.update(self._convert_config_dict(dict(arg[2:].split("=", 1) for arg in several)))
        return values

    return _load_cmd_line


def wrap_init_device(original):
    """``Config._init_device``: the gloo backend for CPU processes, and anomaly detection as configured."""
    import torch

    from recbole_llm.training import distributed

    @functools.wraps(original)
    def _init_device(self):
        if not distributed.init_gloo_device(self.final_config_dict):
            original(self)  # one process, or RecBole's own nccl set-up
        if self.final_config_dict.get("device") is not None and self.final_config_dict["device"].type == "cpu":
            self.final_config_dict["use_gpu"] = False  # what runs, not overall.yaml's default (the run log shows it)
        # RecBole's sine.py turned this on at import; it costs a quarter of the wall time for nothing.
        torch.autograd.set_detect_anomaly(bool(self.final_config_dict.get("detect_anomaly")))

    return _init_device


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
