"""Safe loading of RecBole checkpoints on torch >= 2.6.

RecBole 1.2.1 saves ``{"config": Config, "epoch", "cur_step", "best_valid_score", "state_dict",
"other_parameter", "optimizer"}`` with ``pickle_protocol=4``. torch >= 2.6 loads with ``weights_only=True``
by default, whose unpickler refuses both the pickled ``Config`` and protocol 4's opcodes ("Unsupported
operand 149"), so ``Trainer.evaluate(load_best_model=True)``, ``resume_checkpoint`` and
``load_data_and_model`` all fail.

The answer here is not ``weights_only=False``: a checkpoint is a file a user may download, and unpickling
runs code. It is Python's documented way of restricting globals (a ``pickle.Unpickler`` whose
``find_class`` accepts an allow-list), handed to ``torch.load`` as its ``pickle_module``. The allow-list is
torch's own weights-only list plus exactly the classes RecBole's checkpoints contain.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import re
import types
import zipfile
from typing import Any, Iterator

from recbole_llm.errors import RecboleLLMError


def _recbole_globals() -> dict[str, Any]:
    """The globals a RecBole checkpoint pickles besides tensors: its Config and what the Config holds."""
    import copyreg

    import numpy as np
    import yaml
    from recbole.config.configurator import Config
    from recbole.utils import enum_type

    allowed: list[Any] = [
        Config,
        enum_type.ModelType,
        enum_type.InputType,
        enum_type.EvaluatorType,
        enum_type.FeatureType,
        enum_type.FeatureSource,
        # Config keeps the YAML loader *class* it parsed its files with; the class is never called.
        yaml.loader.FullLoader,
        # how pickle rebuilds a plain object (Config) without calling its __init__
        copyreg._reconstructor,
        object,
        # numpy scalars RecBole stores as-is (best_valid_score, some metric values)
        np.core.multiarray.scalar,
        np.dtype,
        np.core.multiarray._reconstruct,
        np.ndarray,
    ]
    names = {f"{obj.__module__}.{obj.__qualname__}": obj for obj in allowed}
    names["builtins.object"] = object
    for dtype_class in (np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Int64DType):
        names[f"numpy.dtypes.{dtype_class.__name__}"] = dtype_class
    return names


def _torch_globals() -> dict[str, Any]:
    """torch's own weights-only allow-list (tensors, storages, dtypes, OrderedDict, torch.device ...)."""
    import collections

    import torch

    try:
        from torch._weights_only_unpickler import _get_allowed_globals, _get_user_allowed_globals

        return {**_get_allowed_globals(), **_get_user_allowed_globals()}
    except ImportError:  # private API moved: fall back to what RecBole checkpoints need
        return {
            "collections.OrderedDict": collections.OrderedDict,
            "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
            "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
            "torch.device": torch.device,
            "torch.Size": torch.Size,
        }


@functools.lru_cache(maxsize=1)
def allowed_globals() -> dict[str, Any]:
    return {**_torch_globals(), **_recbole_globals()}


def _recommender_class(module: str, name: str) -> type | None:
    """A RecBole or plugin model class named by the checkpoint's Config (its ``model_class``), else None.

    Only modules inside ``recbole.model`` or the plugin's model registry are imported, and only a
    subclass of RecBole's ``AbstractRecommender`` is returned.
    """
    import importlib

    from recbole.model.abstract_recommender import AbstractRecommender

    from recbole_llm.registry import PLUGIN_MODELS

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


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only resolves allow-listed globals, so loading can never run foreign code."""

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        allowed = allowed_globals().get(key) or _recommender_class(module, name)
        if allowed is None:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {key}")
        return allowed


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load needs of a pickle_module: Unpickler, load and loads.
restricted_pickle = types.ModuleType("recbole_llm_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load
restricted_pickle.loads = lambda data, **kwargs: _restricted_load(io.BytesIO(data), **kwargs)
restricted_pickle.UnpicklingError = pickle.UnpicklingError
restricted_pickle.__version__ = pickle.format_version


def safe_torch_load(f, map_location: Any = None, **kwargs) -> Any:
    """``torch.load`` for RecBole checkpoints: allow-listed globals only, any pickle protocol."""
    import torch

    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)
    # torch.serialization.load, not torch.load: the latter is swapped while RecBole loads.
    return torch.serialization.load(
        f, map_location=map_location, pickle_module=restricted_pickle, weights_only=False, **kwargs
    )


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a RecBole checkpoint safely, or fail with a one-line error that says why."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RecboleLLMError(
            f"checkpoint '{path}' does not exist: pass the .pth file RecBole saved (see saved/)"
        )
    try:
        checkpoint = safe_torch_load(path, map_location=map_location)
    except pickle.UnpicklingError as error:
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if unsupported:
            raise RecboleLLMError(
                f"refusing to load '{path}': it references '{unsupported.group(1)}', which a RecBole "
                "checkpoint never holds; load only checkpoints saved by RecBole or recbole_llm"
            ) from None
        raise RecboleLLMError(
            f"'{path}' is not a RecBole checkpoint (unreadable pickle); "
            "pass the .pth file that RecBole's trainer saved under saved/"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, IndexError, KeyError) as error:
        raise RecboleLLMError(
            f"'{path}' is not a RecBole checkpoint ({type(error).__name__}); "
            "pass the .pth file that RecBole's trainer saved under saved/"
        ) from None
    missing = {"config", "state_dict"} - set(checkpoint) if isinstance(checkpoint, dict) else {"config"}
    if missing:
        raise RecboleLLMError(
            f"'{path}' is not a RecBole checkpoint: it lacks {sorted(missing)}; "
            "pass the .pth file that RecBole's trainer saved under saved/"
        )
    return checkpoint


@contextlib.contextmanager
def recbole_loads_safely() -> Iterator[None]:
    """While active, RecBole's own ``torch.load`` calls go through :func:`safe_torch_load`."""
    import torch

    if getattr(torch.load, "__recbole_llm__", False):  # nested: already safe
        yield
        return
    original = torch.load

    @functools.wraps(original)
    def load(f, map_location=None, *args, **kwargs):
        return safe_torch_load(f, map_location, *args, **kwargs)

    load.__recbole_llm__ = True
    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def loads_safely(function):
    """Decorate a RecBole function that calls ``torch.load`` on a checkpoint."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with recbole_loads_safely():
            return function(*args, **kwargs)

    wrapper.__recbole_llm__ = True
    return wrapper


def install() -> None:
    """Route RecBole's checkpoint loads (evaluate, resume, load_data_and_model) through the safe loader."""
    import recbole.quick_start as quick_start_package
    from recbole.quick_start import quick_start
    from recbole.trainer import trainer

    for cls in {trainer.Trainer, *_subclasses(trainer.Trainer)}:
        for method in ("evaluate", "resume_checkpoint"):
            function = cls.__dict__.get(method)
            if function is not None and not getattr(function, "__recbole_llm__", False):
                setattr(cls, method, loads_safely(function))

    original = quick_start.load_data_and_model
    if not getattr(original, "__recbole_llm__", False):

        @functools.wraps(original)
        def load_data_and_model(model_file):
            load_checkpoint(model_file)  # a clear one-line error for a file that is not a checkpoint
            with recbole_loads_safely():
                return original(model_file)

        load_data_and_model.__recbole_llm__ = True
        quick_start.load_data_and_model = load_data_and_model
        quick_start_package.load_data_and_model = load_data_and_model


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found
