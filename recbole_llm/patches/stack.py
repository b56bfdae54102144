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
- torch >= 2.6 refuses RecBole's checkpoints: :mod:`recbole_llm.checkpoint.loading` loads them through an
  allow-list instead.
- RecBole's metrics use ``np.float`` and friends, which only ``Config.__init__`` recreates; a process that
  unpickles a Config (``load_data_and_model``) never runs it. RecBole's own aliasing runs at import.
- RecBole on this stack prints warnings that are not the user's business; they are filtered by message.

The other fixes live with their topic: :mod:`recbole_llm.patches.config` (Config),
:mod:`recbole_llm.patches.data` (atomic files, datasets, dataloaders), :mod:`recbole_llm.patches.evaluator`
(evaluation) and :mod:`recbole_llm.patches.models` (Pop). Importing this module imports neither torch nor
RecBole: ``import recbole_llm`` silences the stack noise with it.
"""

from __future__ import annotations

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


def compatibility_settings(self) -> None:
    """``Config.compatibility_settings`` without numpy 2's missing aliases: only those numpy lacks."""
    numpy_aliases()


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


def quiet_stack() -> None:
    """Warnings and log records of RecBole's dependencies that say nothing the user can act on, silenced."""
    silence_stack_noise()
    _quiet_ray_session_log()


def ensure_dir(dir_path) -> None:
    """RecBole's ``ensure_dir`` without its check-then-create race between DDP ranks."""
    os.makedirs(dir_path, exist_ok=True)
