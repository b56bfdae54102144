"""Safe loading of RecBole checkpoints on torch >= 2.6.

RecBole 1.2.1 saves ``{"config": Config, "epoch", "cur_step", "best_valid_score", "state_dict",
"other_parameter", "optimizer"}`` with ``pickle_protocol=4``. torch >= 2.6 loads with ``weights_only=True``
by default, whose unpickler refuses both the pickled ``Config`` and protocol 4's opcodes ("Unsupported
operand 149"), so ``Trainer.evaluate(load_best_model=True)``, ``resume_checkpoint`` and
``load_data_and_model`` all fail.

The answer here is not ``weights_only=False``: a checkpoint is a file a user may download, and unpickling
runs code. :func:`safe_torch_load` reads the plugin's pickle-free files as data and RecBole's own through
the allow-listed unpickler of :mod:`recbole_llm.checkpoint.unpickler`; then what it loaded is checked
(:mod:`recbole_llm.checkpoint.checks`, and the checks a run's Config gets), with this machine and the user's
overrides applied (:mod:`recbole_llm.checkpoint.overrides`).

Each load reads the file once: :func:`read_once` reads and checks it, and RecBole's own ``torch.load`` of
the same file (``load_data_and_model``, ``resume_checkpoint``, ``evaluate``) gets that dict.
:func:`load_for_use` is ``load_data_and_model`` on one read, with overrides and an early check.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
import re
import stat
import zipfile
from typing import TYPE_CHECKING, Any, Callable, Iterator

from recbole_llm.checkpoint import format as checkpoint_format
from recbole_llm.checkpoint.checks import _check_counters, _check_other_parameter, _distrust, explain_unfitting_weights
from recbole_llm.checkpoint.overrides import (
    _OVERRIDES,
    apply_overrides,
    config_overrides,
    follow_this_machine,
    follow_this_process,
)
from recbole_llm.checkpoint.unpickler import _resolve, restricted_pickle
from recbole_llm.errors import CheckpointError, RecboleLLMError, shown
from recbole_llm.model import catalog

if TYPE_CHECKING:  # RecBole is imported when these are used, not when this module is
    from recbole.config import Config
    from recbole.data.dataloader import AbstractDataLoader
    from recbole.data.dataset import Dataset
    from recbole.model.abstract_recommender import AbstractRecommender


def safe_torch_load(f, map_location: Any = None, **kwargs) -> Any:
    """``torch.load`` for RecBole checkpoints: the plugin's pickle-free files (:mod:`checkpoint_format`)
    read as data, RecBole's own ``.pth`` through :class:`~recbole_llm.checkpoint.unpickler.RestrictedUnpickler`,
    any pickle protocol.

    A checkpoint trained on a GPU loads on a machine without CUDA: with no ``map_location`` its
    storages go to the CPU, and a ``Config`` in it gets this machine's device
    (:func:`~recbole_llm.checkpoint.overrides.follow_this_machine`). Its Config is then made safe to use
    (:func:`~recbole_llm.checkpoint.checks._distrust`) and the active overrides applied.
    """
    import torch

    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)
    if map_location is None and not torch.cuda.is_available():
        map_location = "cpu"
    if isinstance(f, (str, os.PathLike)):
        if not stat.S_ISREG(os.stat(f).st_mode):  # a FIFO or a device would block or never end
            raise ValueError("not a regular file")
        if checkpoint_format.is_pickle_free(f):
            loaded = checkpoint_format.load(f, map_location=map_location)
            return _made_safe(loaded, f)
        if not zipfile.is_zipfile(f):
            # torch's legacy formats (tar, raw pickle) put other pickles in the file: a tar's first member
            # name is the file's first bytes, which plain pickle.load elsewhere would run. RecBole and
            # torch have written zip checkpoints since torch 1.6.
            raise ValueError("neither a recbole_llm checkpoint (safetensors) nor a RecBole one (torch zip)")
    # torch.serialization.load, not torch.load: the latter is swapped while RecBole loads.
    loaded = torch.serialization.load(
        f, map_location=map_location, pickle_module=restricted_pickle, weights_only=False, **kwargs
    )
    _resolve(loaded)
    return _made_safe(loaded, f)


def _made_safe(loaded: Any, f: Any) -> Any:
    """A loaded checkpoint's Config distrusted, the user's overrides applied, and every value checked as a
    run's own would be (a checkpoint's values reach RecBole as they are); the trainer's counters checked."""
    if isinstance(loaded, dict) and "config" in loaded:
        config = loaded["config"]
        _distrust(config, os.path.dirname(os.path.abspath(os.fspath(f))) if isinstance(f, (str, os.PathLike))
                  else None)
        _check_other_parameter(loaded.get("other_parameter"), getattr(config, "model_class", None))
        _check_counters(loaded)
        follow_this_machine(config)
        overrides = _OVERRIDES.get() or {}
        apply_overrides(config, overrides)
        _check_values(config.final_config_dict, overrides)
    return loaded


# Set while init_from loads a checkpoint: the run's own settings build and load every model, the checkpoint's
# model names are only compared with them, so a name that is not a folder here is no reason to refuse it.
_NAMES_COMPARED_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("recbole_llm_names_compared_only",
                                                                           default=False)


@contextlib.contextmanager
def names_compared_only() -> Iterator[None]:
    """While active, a loaded checkpoint's model names (``pretrained_model_name_or_path``,
    ``text_model_name_or_path``) need not be folders here: the caller loads no model by them (init_from)."""
    token = _NAMES_COMPARED_ONLY.set(True)
    try:
        yield
    finally:
        _NAMES_COMPARED_ONLY.reset(token)


def load_for_comparison(path: str | os.PathLike) -> dict:
    """:func:`load_checkpoint` for init_from: this run's own settings build and load every model, so the
    checkpoint's model names are only compared with them, not required to be folders here."""
    with names_compared_only():
        return load_checkpoint(path)


def _check_values(final: dict, overrides: dict) -> None:
    """The checks a run's Config gets, on a checkpoint's; and no encoder fetched because a checkpoint names it."""
    import torch
    from recbole.utils import ModelType

    from recbole_llm.model.backbone import resolve_pretrained
    from recbole_llm.config import check_config_values

    if not isinstance(final.get("MODEL_TYPE"), ModelType) or not isinstance(final.get("device"), torch.device) \
            or final["device"].type not in ("cpu", "cuda") or not isinstance(final.get("state"), str):
        raise CheckpointError("refusing a checkpoint whose config's MODEL_TYPE, device or state is not one RecBole "
                              "writes; load only checkpoints saved by RecBole or recbole_llm")
    check_config_values(final)
    if _NAMES_COMPARED_ONLY.get() or final["model"] not in catalog.PLUGIN_MODELS:
        return
    item_repr = final.get("item_repr")
    has_text = isinstance(item_repr, str) and "text" in item_repr.lower()
    for key, what in (("pretrained_model_name_or_path", "encoder"), ("text_model_name_or_path", "text model")):
        name = final.get(key) if key != "text_model_name_or_path" or has_text else None  # read only for item text
        if isinstance(name, str) and key not in overrides and not os.path.isdir(resolve_pretrained(name)):
            raise CheckpointError(
                f"the checkpoint's {what} {name!r:.80} is neither a folder here nor bundled with an installed "
                f"package, and a checkpoint never makes recbole_llm download one: pass --{key}=DIR (a local copy "
                "of it)")


def check_exists(path: str | os.PathLike) -> None:
    """A one-line error for a checkpoint path that is not a file (checked before anything heavy loads)."""
    if os.path.isdir(os.fspath(path)):
        raise CheckpointError(f"checkpoint '{os.fspath(path)}' is a folder: pass the .pth file RecBole saved in it "
                              "(see saved/)")
    if not os.path.isfile(os.fspath(path)):
        raise CheckpointError(
            f"checkpoint '{os.fspath(path)}' does not exist: pass the .pth file RecBole saved (see saved/)"
        )


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a RecBole checkpoint safely, or fail with a one-line error that says why.

    Inside :func:`read_once` for the same file: the dict read there, not a second read.
    """
    path = os.fspath(path)
    already = _already_read(path)
    if already is not None:
        return already
    check_exists(path)
    try:
        checkpoint = safe_torch_load(path, map_location=map_location)
    except pickle.UnpicklingError as error:
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if unsupported:
            raise CheckpointError(
                f"refusing to load '{path}': it references '{unsupported.group(1)}', which a RecBole "
                "checkpoint never holds; load only checkpoints saved by RecBole or recbole_llm"
            ) from None
        if str(error).startswith("Unsupported"):
            raise CheckpointError(
                f"refusing to load '{path}': it asks for an unsupported {str(error)[12:].strip()}; "
                "load only checkpoints saved by RecBole or recbole_llm"
            ) from None
        raise CheckpointError(
            f"'{path}' is not a RecBole checkpoint (unreadable pickle); "
            "pass the .pth file that RecBole's trainer saved under saved/"
        ) from None
    except RecboleLLMError:
        raise
    except (Exception, RecursionError) as error:  # torch's, pickle's, safetensors' and json's many ways
        detail = str(error).splitlines()[0][:160] if isinstance(error, ValueError) and str(error) else ""
        raise CheckpointError(
            f"'{path}' is not a RecBole checkpoint ({type(error).__name__}{': ' + detail if detail else ''}); "
            "pass the .pth file that RecBole's trainer saved under saved/"
        ) from None
    missing = {"config", "state_dict"} - set(checkpoint) if isinstance(checkpoint, dict) else {"config"}
    if missing:
        raise CheckpointError(
            f"'{path}' is not a RecBole checkpoint: it lacks {sorted(missing)}; "
            "pass the .pth file that RecBole's trainer saved under saved/"
        )
    _check_no_nan(path, checkpoint["state_dict"])
    return checkpoint


def _check_no_nan(path: str, state_dict: Any) -> None:
    """A weight that is NaN (training diverged, or the file was edited) makes every score NaN: RecBole's
    evaluator then ranks items in an arbitrary order and reports it, with no error."""
    import torch

    for name, value in state_dict.items() if isinstance(state_dict, dict) else ():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and bool(torch.isnan(value).any()):
            raise CheckpointError(f"'{path}' holds NaN weights in '{shown(name, 80)}' (training diverged?): use an "
                                  "earlier checkpoint, or train again with a lower learning_rate")


def _recbole_torch_load(f, map_location=None, *args, **kwargs):
    """What RecBole's ``torch.load`` calls become inside :func:`recbole_loads_safely`."""
    already = _already_read(f)
    if already is not None:
        return already
    return safe_torch_load(f, map_location, *args, **kwargs)


@contextlib.contextmanager
def recbole_loads_safely() -> Iterator[None]:
    """While active, RecBole's own ``torch.load`` calls go through :func:`safe_torch_load`, and a file
    :func:`read_once` already read is not read again."""
    import torch

    if torch.load is _recbole_torch_load:  # nested: already safe
        yield
        return
    original = torch.load
    torch.load = _recbole_torch_load
    try:
        yield
    finally:
        torch.load = original


# Checkpoints read by the active read_once contexts, by real path.
_READ: contextvars.ContextVar[dict[str, dict]] = contextvars.ContextVar("recbole_llm_read_checkpoints", default={})


def _already_read(f: Any) -> dict | None:
    if not isinstance(f, (str, os.PathLike)):
        return None
    return _READ.get().get(os.path.realpath(os.fspath(f)))


@contextlib.contextmanager
def read_once(path: str | os.PathLike, map_location: Any = "cpu") -> Iterator[dict]:
    """The checkpoint at ``path``, read and checked once (:func:`load_checkpoint`); while active, every
    further load of ``path`` (``load_checkpoint``, RecBole's own ``torch.load``) returns this same dict.

    Nested for the same file, the outer context's dict is used and ``map_location`` is the outer one's.
    """
    checkpoint = load_checkpoint(path, map_location=map_location)
    token = _READ.set({**_READ.get(), os.path.realpath(os.fspath(path)): checkpoint})
    try:
        with recbole_loads_safely():
            yield checkpoint
    finally:
        _READ.reset(token)


def _recbole_load_data_and_model() -> Callable:
    """RecBole's own ``load_data_and_model``, which :mod:`recbole_llm.patches` keeps under the plugin's."""
    from recbole.quick_start import quick_start

    function = quick_start.load_data_and_model
    return getattr(function, "__wrapped__", function)


def load_for_use(
    path: str | os.PathLike,
    overrides: dict | None = None,
    check: Callable[[Config], None] | None = None,
) -> tuple[Config, AbstractRecommender, Dataset, AbstractDataLoader, AbstractDataLoader, AbstractDataLoader]:
    """RecBole's ``load_data_and_model`` with the checkpoint read once: ``(config, model, dataset,
    train_data, valid_data, test_data)``.

    The file is read and checked once (one-line errors for a missing, foreign or refused file); ``overrides``
    are set on its Config (:func:`config_overrides`; without them the active ``config_overrides`` apply);
    ``check(config)`` runs before any data is built, to refuse early what the caller cannot use. Then
    RecBole's own ``load_data_and_model`` builds data and model from that same dict, with ``sys.argv`` out
    of its reach (RecBole reads ``--key=value`` from it).
    """
    import sys

    path = os.fspath(path)
    with config_overrides(overrides) if overrides else contextlib.nullcontext():
        with read_once(path, map_location=None) as checkpoint:  # None: where RecBole's own call puts tensors
            if check is not None:
                check(checkpoint["config"])
            follow_this_process(checkpoint["config"])
            argv, sys.argv = sys.argv, sys.argv[:1]
            try:
                return _recbole_load_data_and_model()(path)
            except RuntimeError as error:
                explained = explain_unfitting_weights(error, path)
                if explained is None:
                    raise
                raise explained from None
            finally:
                sys.argv = argv


def check_same_ids(trained_config: Any, config: Any, resume_file: str) -> None:
    """Refuse to resume on data whose ids differ from the data the checkpoint was trained on."""
    from recbole_llm.checkpoint import lineage as world

    trained, here = world.stored(trained_config), world.stored(config)
    if trained and here and trained["token_maps"] != here["token_maps"]:
        raise CheckpointError(
            f"resume_from '{resume_file}' was trained on data whose ids differ from this run's "
            f"('{config['dataset']}' at {config['data_path']}): its weights would score other items; "
            "resume on the data it was trained with"
        )
