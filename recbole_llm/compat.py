"""RecBole 1.2.1 on today's stack: the fixes that pins in pyproject.toml cannot make.

What pins fix (see pyproject.toml): ray 2.6.3 needs ``pkg_resources`` (setuptools < 81) and ``np.bool8``
(numpy < 2); ``Config`` assigns ``np.float_`` (numpy < 2); pandas 3 turns RecBole's column
``fillna(inplace=True)`` into a silent no-op (pandas < 3).

What this module fixes, each by wrapping a RecBole function rather than copying it:

- torch >= 2.6 refuses RecBole's checkpoints: :mod:`recbole_llm.checkpoint` loads them through an
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
"""

from __future__ import annotations

import functools
import logging
import os
import warnings

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


def _install_config_fixes() -> None:
    import torch
    from recbole.config import configurator
    from recbole.utils import ModelType

    Config = configurator.Config
    if getattr(Config._set_default_parameters, "__recbole_llm__", False):
        return
    original_defaults = Config._set_default_parameters
    original_init_device = Config._init_device

    @functools.wraps(original_defaults)
    def _set_default_parameters(self):
        final = self.final_config_dict
        user_set_sampling = "train_neg_sample_args" in self.external_config_dict
        if (
            final.get("loss_type") == "CE"
            and final.get("MODEL_TYPE") == ModelType.SEQUENTIAL
            and not user_set_sampling
        ):
            final["train_neg_sample_args"] = None
        final.setdefault("detect_anomaly", False)
        final.setdefault("allow_download", False)
        final.setdefault("tail_threshold", 20)  # recbole_llm.metrics: TailNDCG / TailRecall
        final.setdefault("dist_backend", None)  # recbole_llm.distributed: None = nccl with CUDA, else gloo
        original_defaults(self)

    @functools.wraps(original_init_device)
    def _init_device(self):
        original_init_device(self)
        # RecBole's sine.py turned this on at import; it costs a quarter of the wall time for nothing.
        torch.autograd.set_detect_anomaly(bool(self.final_config_dict.get("detect_anomaly")))

    _set_default_parameters.__recbole_llm__ = True
    Config._set_default_parameters = _set_default_parameters
    Config._init_device = _init_device


def _install_offline_dataset_check() -> None:
    from recbole.data.dataset import dataset as dataset_module

    Dataset = dataset_module.Dataset
    if getattr(Dataset._download, "__recbole_llm__", False):
        return
    original_download = Dataset._download

    @functools.wraps(original_download)
    def _download(self):
        name, path = self.dataset_name, os.path.abspath(self.dataset_path)
        if self.config["allow_download"] and self._get_download_url("url", allow_none=True):
            return original_download(self)
        known = self._get_download_url("url", allow_none=True) is not None
        fix = (
            f"put RecBole atomic files ({name}.inter, ...) in '{path}' or set data_path to the folder "
            f"that holds '{name}/'"
        )
        if known:
            fix += " (RecBole can download it: set allow_download=True)"
        raise RecboleLLMError(f"dataset '{name}' not found: no folder '{path}'; {fix}")

    _download.__recbole_llm__ = True
    Dataset._download = _download


def install() -> None:
    """Apply every fix. Idempotent; called by ``import recbole_llm``."""
    silence_stack_noise()
    _quiet_ray_session_log()
    import torch

    from recbole_llm import checkpoint

    checkpoint.install()
    from recbole_llm import metrics

    metrics.install()
    _install_config_fixes()
    _install_offline_dataset_check()
    from recbole.config.configurator import Config

    Config.compatibility_settings(None)  # RecBole's own numpy aliases; the method never reads self
    # RecBole leaves anomaly detection on from import until a Config switches it: off by default.
    torch.autograd.set_detect_anomaly(False)
