"""RecBole 1.2.1 on today's stack: the fixes that pins in pyproject.toml cannot make.

What a pin fixes (see pyproject.toml): pandas 3 turns RecBole's column ``fillna(inplace=True)`` into a
silent no-op (pandas < 3).

What this module fixes, each by wrapping a RecBole function rather than copying it:

- ``recbole/quick_start/quick_start.py`` imports ray at module level (``from ray import tune``, used only
  by ``objective_function``'s ``tune.report``), and RecBole 1.2.1 pins ray<=2.6.3, which has no wheels for
  Python >= 3.12, needs ``pkg_resources`` (gone in setuptools 81) and ``np.bool8`` (gone in numpy 2).
  ray becomes optional: where it does not import, quick_start gets a stand-in ``tune`` whose use says
  that ray-based hyper-parameter search needs ray; everything else works.
- ``Config.compatibility_settings`` assigns ``np.float = np.float_`` and friends; numpy 2 removed
  ``np.float_``, ``np.complex_`` and ``np.unicode_``, so every ``Config()`` fails. It becomes a version
  that adds only the aliases numpy lacks (RecBole's metrics and samplers still use ``np.float``).
- RecBole's metrics return numpy scalars; numpy 2 prints them as ``np.float64(0.05)``, so the result
  dicts RecBole logs stop being plain Python literals. ``Evaluator.evaluate`` returns Python floats.
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
    """Stands in for ``ray.tune`` in RecBole's quick_start when ray cannot be imported."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

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

    def compatibility_settings(self):
        numpy_aliases()

    _set_default_parameters.__recbole_llm__ = True
    Config._set_default_parameters = _set_default_parameters
    Config._init_device = _init_device
    Config.compatibility_settings = compatibility_settings


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


def _install_plain_metric_values() -> None:
    from recbole.evaluator import evaluator as evaluator_module

    Evaluator = evaluator_module.Evaluator
    if getattr(Evaluator.evaluate, "__recbole_llm__", False):
        return
    original = Evaluator.evaluate

    @functools.wraps(original)
    def evaluate(self, dataobject):
        import numpy as np

        result = original(self, dataobject)
        for key, value in result.items():
            if isinstance(value, np.generic):
                result[key] = value.item()
        return result

    evaluate.__recbole_llm__ = True
    Evaluator.evaluate = evaluate


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
    _install_plain_metric_values()
    numpy_aliases()
    # RecBole leaves anomaly detection on from import until a Config switches it: off by default.
    torch.autograd.set_detect_anomaly(False)
