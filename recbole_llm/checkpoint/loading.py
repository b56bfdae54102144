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

Each load reads the file once: :func:`read_once` reads and checks it, and RecBole's own ``torch.load`` of
the same file (``load_data_and_model``, ``resume_checkpoint``, ``evaluate``) gets that dict.
:func:`load_for_use` is ``load_data_and_model`` on one read, with overrides and an early check.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import io
import os
import pickle
import re
import stat
import types
import zipfile
from typing import TYPE_CHECKING, Any, Callable, Iterator

from recbole_llm.checkpoint import format as checkpoint_format
from recbole_llm.model import catalog
from recbole_llm.errors import RecboleLLMError

if TYPE_CHECKING:  # RecBole is imported when these are used, not when this module is
    from recbole.config import Config
    from recbole.data.dataloader import AbstractDataLoader
    from recbole.data.dataset import Dataset
    from recbole.model.abstract_recommender import AbstractRecommender


def _numpy_multiarray():
    try:  # numpy 2 (numpy.core is a deprecated alias there)
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    return multiarray


def _callable_globals() -> dict[str, Any]:
    """Functions and classes a checkpoint may *call*, each harmless whatever arguments a pickle chooses.

    torch's own weights-only allow-list (tensor and storage rebuilds, dtypes, ``torch.Size``,
    ``OrderedDict`` ...) less the functions that call, instantiate or keep as hooks something they are
    handed (:data:`_CALLS_ITS_ARGUMENTS`), and numpy's array, scalar and dtype rebuilds. Nothing here
    evaluates strings, imports modules or touches files, and none of it calls an argument: every callable
    a pickle can reach is on this list (the other lists' classes reach the stack as inert
    :class:`_Named` stand-ins), so whatever a pickle nests, at any depth, calls only these.
    """
    import collections

    import numpy as np
    import torch

    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        names = dict(_get_allowed_globals())
    except ImportError:  # private API moved: what RecBole checkpoints need
        names = {
            "collections.OrderedDict": collections.OrderedDict,
            "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
            "torch.device": torch.device,
            "torch.Size": torch.Size,
        }
    for name in _NOT_ADMITTED:
        names.pop(name, None)
    # tensors and Parameters carry backward hooks, callables torch runs later: only ones without hooks
    for name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter"):
        if hasattr(torch._utils, name):
            names[f"torch._utils.{name}"] = _without_hooks(getattr(torch._utils, name))
    multiarray = _numpy_multiarray()
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # saved under numpy 1 or 2
        names[f"{module}._reconstruct"] = _empty_array
        names[f"{module}.scalar"] = multiarray.scalar
    names["numpy.dtype"] = np.dtype
    for name in dir(np.dtypes):  # numpy 2 pickles dtypes through their DType classes
        candidate = getattr(np.dtypes, name)
        if isinstance(candidate, type) and issubclass(candidate, np.dtype):
            names[f"numpy.dtypes.{name}"] = candidate
    return names


# torch's weights-only globals a RecBole checkpoint never needs and a crafted one could use: the rebuilds that
# call or instantiate an argument (``_rebuild_from_type_v2(func, new_type, args, state)`` runs
# ``func(*args)``; ``_rebuild_wrapper_subclass(cls, ...)`` builds ``cls``) or set attributes taken from the
# pickle; sparse and nested tensors (torch does not check a sparse tensor's indices: ``to_dense`` on a
# crafted one crashes the process); and ``bytearray(n)``, which fills n bytes before any check.
_NOT_ADMITTED = (
    "torch._tensor._rebuild_from_type_v2",
    "torch._utils._rebuild_wrapper_subclass",
    "torch._utils._rebuild_parameter_with_state",
    "torch._utils._rebuild_sparse_tensor",
    "torch._utils._rebuild_nested_tensor",
    "builtins.bytearray",
)


def _without_hooks(rebuild: Callable) -> Callable:
    """torch's tensor or Parameter rebuild, refusing backward hooks (its sixth or third argument)."""
    hooks_at = 2 if rebuild.__name__ == "_rebuild_parameter" else 5

    @functools.wraps(rebuild)
    def rebuild_without_hooks(*args: Any) -> Any:
        if len(args) > hooks_at and args[hooks_at]:
            raise pickle.UnpicklingError(f"Unsupported tensor with backward hooks ({rebuild.__name__})")
        return rebuild(*args)

    return rebuild_without_hooks


def _empty_array(subtype: Any, shape: Any, dtype: Any) -> Any:
    """numpy's ``_reconstruct`` as numpy's own pickles call it: an empty ndarray that ``BUILD`` then fills
    from the file's bytes (any other shape would allocate what the pickle asks, before any check)."""
    import numpy as np

    if subtype is not np.ndarray or shape != (0,):
        raise pickle.UnpicklingError("Unsupported numpy array reconstruction")
    return _numpy_multiarray()._reconstruct(np.ndarray, (0,), dtype)


def _state_classes() -> dict[str, type]:
    """Classes rebuilt from their state only: ``object.__new__`` then ``__dict__`` update, never called.

    RecBole's ``Config`` is one: calling it runs ``eval`` on strings of its ``config_dict``.
    """
    from recbole.config.configurator import Config

    return {"recbole.config.configurator.Config": Config, "builtins.object": object}


def _enum_classes() -> dict[str, type]:
    """RecBole's enums: a pickle may only look a member up by its value."""
    from recbole.utils import enum_type

    enums = (enum_type.ModelType, enum_type.InputType, enum_type.EvaluatorType, enum_type.FeatureType,
             enum_type.FeatureSource)
    return {f"{cls.__module__}.{cls.__qualname__}": cls for cls in enums}


def _value_classes() -> dict[str, type]:
    """Classes a checkpoint holds as values and never calls: ``Config`` keeps its YAML loader class."""
    import yaml

    return {"yaml.loader.FullLoader": yaml.loader.FullLoader}


class _Named:
    """What a pickle gets for a class it may name but never call (``Config``, an enum, a model class).

    Not callable and holding no callable attribute, so no admitted function can call the class through it,
    however deep a pickle nests the call. The unpickler's own opcodes use :attr:`cls` where the class's
    kind allows (``NEWOBJ`` for state classes, ``REDUCE`` for enum members), and :func:`_resolve` puts the
    class back where a ``Config`` keeps one (``yaml_loader``, ``model_class``); anywhere else it is refused.
    """

    __slots__ = ("cls", "kind")

    def __init__(self, cls: type, kind: str) -> None:
        self.cls, self.kind = cls, kind

    def __reduce__(self):  # never pickled again
        raise TypeError("not picklable")


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` for state classes only: ``object.__new__(cls)``, no ``__init__``."""
    if not (isinstance(cls, _Named) and cls.kind == "state" and isinstance(base, _Named)
            and base.cls is object and state is None):
        raise pickle.UnpicklingError(f"Unsupported reconstruction of {_name(cls)} from {_name(base)}")
    return object.__new__(cls.cls)


class _AllowLists:
    """The four allow-lists by ``module.name``, with identity sets for the per-opcode checks."""

    def __init__(self) -> None:
        import numpy as np

        self.callables = {**_callable_globals(), "copyreg._reconstructor": _safe_reconstructor}
        self.state = _state_classes()
        self.enums = _enum_classes()
        self.values = _value_classes()
        self.callable_ids = {id(obj) for obj in self.callables.values()}
        self.buildable_ids = {id(cls) for cls in self.state.values()} | {
            id(obj) for obj in self.callables.values() if isinstance(obj, type)
        } | {id(np.ndarray)}
        self.names = {**self.values, **self.enums, **self.state, **self.callables}
        self.kinds = {**{k: "value" for k in self.values}, **{k: "enum" for k in self.enums},
                      **{k: "state" for k in self.state}}


@functools.lru_cache(maxsize=1)
def _allow_lists() -> _AllowLists:
    return _AllowLists()


def allowed_globals() -> dict[str, Any]:
    """Every global a checkpoint may name, by ``module.name``: callables, state, enum and value classes."""
    return _allow_lists().names


def _refuse(message: str) -> None:
    raise pickle.UnpicklingError(message)


def _name(obj: Any) -> str:
    if isinstance(obj, _Named):
        return obj.cls.__qualname__
    return getattr(obj, "__qualname__", type(obj).__name__)


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that names only allow-listed globals and calls only harmless ones.

    Python's pure-Python unpickler with the opcodes that call or build objects checked (the C
    unpickler's opcode table cannot be changed). Globals are looked up by exact ``module.name``, never by
    attribute chains; the callables of :func:`_callable_globals` come back as themselves, every other
    allow-listed class as an inert :class:`_Named`. So ``REDUCE`` can only call those callables (or look
    one of RecBole's enums up by value), and whatever arguments a pickle hands them, nested to any depth,
    hold no other callable: safety by construction, not by how far a check looks. ``NEWOBJ``/``NEWOBJ_EX``
    create state classes with ``object.__new__`` (no ``__init__``) and the allowed classes with their
    ``__new__``; ``BUILD`` restores state only on allow-listed types; the protocol-0/1 ``INST``/``OBJ``
    are refused. A crafted checkpoint can at worst fail to load; it cannot run code.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        lists = _allow_lists()
        found = lists.names.get(key)
        if found is not None and key in lists.kinds:
            return _Named(found, lists.kinds[key])
        if found is not None:
            return found
        model = catalog.recommender_class(module, name)
        if model is None:
            _refuse(f"Unsupported global: GLOBAL {key}")
        return _Named(model, "model")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not isinstance(args, tuple):
            _refuse(f"Unsupported call of {_name(func)}: arguments are not a tuple")
        if not isinstance(func, _Named) and id(func) in _allow_lists().callable_ids:
            self.stack[-1] = func(*args)
        elif isinstance(func, _Named) and func.kind == "enum":
            members = func.cls._value2member_map_
            if len(args) != 1 or not isinstance(args[0], (int, str)) or args[0] not in members:
                _refuse(f"Unsupported call of {_name(func)}: only a member's value is allowed")
            self.stack[-1] = members[args[0]]
        else:
            _refuse(f"Unsupported call of {_name(func)}")

    def _new_object(self, cls: Any, args: Any, kwargs: Any) -> Any:
        if isinstance(cls, _Named) and cls.kind == "state" and args == () and not kwargs:
            return object.__new__(cls.cls)
        if isinstance(cls, type) and id(cls) in _allow_lists().callable_ids and isinstance(args, tuple) \
                and isinstance(kwargs, dict):
            return cls.__new__(cls, *args, **kwargs)
        _refuse(f"Unsupported object creation of {_name(cls)}")

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new_object(cls, args, {}))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new_object(cls, args, kwargs))

    def load_build(self) -> None:
        kind = type(self.stack[-2])  # BUILD's stack: ..., instance, state
        if id(kind) not in _allow_lists().buildable_ids:
            _refuse(f"Unsupported state for {_name(kind)}")
        super().load_build()

    def load_inst(self) -> None:
        _refuse("Unsupported opcode INST (protocol 0/1 object creation)")

    def load_obj(self) -> None:
        _refuse("Unsupported opcode OBJ (protocol 0/1 object creation)")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.INST[0]] = load_inst
    dispatch[pickle.OBJ[0]] = load_obj


# Where a Config keeps a class, and which kind of class each place takes.
_CLASS_PLACES = {"yaml_loader": "value", "model_class": "model"}


def _resolve(loaded: Any) -> None:
    """Put classes back where a ``Config`` keeps them, and refuse any :class:`_Named` left elsewhere, any
    numpy object array and any callable other than the allowed ones, wherever the pickle put them.

    An iterative walk over containers, ``Config`` state and object attributes (tensors' included): as
    deep as the pickle, with no recursion limit to hit.
    """
    import numpy as np
    import torch
    from recbole.config.configurator import Config

    lists = _allow_lists()
    seen: set[int] = set()
    pending = [loaded]
    while pending:
        value = pending.pop()
        if id(value) in seen or value is None or isinstance(value, (bool, int, float, str, bytes)):
            continue
        seen.add(id(value))
        if isinstance(value, _Named):
            _refuse(f"Unsupported use of {_name(value)} as a value")
        if isinstance(value, Config):
            state = value.__dict__
            for place, kind in _CLASS_PLACES.items():
                named = state.get(place)
                if isinstance(named, _Named) and named.kind == kind:
                    state[place] = named.cls
                    seen.add(id(named.cls))
            pending.extend(state.values())
            continue
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            pending.extend(value)
        elif isinstance(value, np.ndarray) and value.dtype.hasobject:
            _refuse("Unsupported numpy array of Python objects")
        elif callable(value) and id(value) not in lists.callable_ids and not isinstance(value, torch.Tensor):
            _refuse(f"Unsupported callable {_name(value)} as a value")
        attributes = getattr(value, "__dict__", None)  # what BUILD may have set; enum members are RecBole's own
        if isinstance(attributes, dict) and not isinstance(value, (type, enum.Enum)):
            pending.extend(attributes.values())


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
    """``torch.load`` for RecBole checkpoints: the plugin's pickle-free files (:mod:`checkpoint_format`)
    read as data, RecBole's own ``.pth`` through :class:`RestrictedUnpickler`, any pickle protocol.

    A checkpoint trained on a GPU loads on a machine without CUDA: with no ``map_location`` its
    storages go to the CPU, and a ``Config`` in it gets this machine's device (:func:`follow_this_machine`).
    Its Config is then made safe to use (:func:`_distrust`) and the active overrides applied.
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


def _check_values(final: dict, overrides: dict) -> None:
    """The checks a run's Config gets, on a checkpoint's; and no encoder fetched because a checkpoint names it."""
    import torch
    from recbole.utils import ModelType

    from recbole_llm.patches.compat import check_config_values
    from recbole_llm.model.backbone import resolve_pretrained

    if not isinstance(final.get("MODEL_TYPE"), ModelType) or not isinstance(final.get("device"), torch.device) \
            or final["device"].type not in ("cpu", "cuda") or not isinstance(final.get("state"), str):
        raise RecboleLLMError("refusing a checkpoint whose config's MODEL_TYPE, device or state is not one RecBole "
                              "writes; load only checkpoints saved by RecBole or recbole_llm")
    check_config_values(final)
    name = final.get("pretrained_model_name_or_path")
    if final["model"] in catalog.PLUGIN_MODELS and isinstance(name, str) \
            and "pretrained_model_name_or_path" not in overrides and not os.path.isdir(resolve_pretrained(name)):
        raise RecboleLLMError(
            f"the checkpoint's encoder {name!r:.80} is neither a folder here nor bundled with an installed package, "
            "and a checkpoint never makes recbole_llm download one: pass --pretrained_model_name_or_path=DIR "
            "(a local copy of it)")


# The trainer's counters in a checkpoint (RecBole's resume reads them): type and range.
_COUNTERS = {"epoch": (0, 10**7), "cur_step": (0, 10**7), "global_step": (0, 10**12)}


def _check_counters(loaded: dict) -> None:
    for key, (low, high) in _COUNTERS.items():
        value = loaded.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
            raise pickle.UnpicklingError(f"Unsupported {key} {value!r:.40}: an integer from {low} below {high}")
    score = loaded.get("best_valid_score", 0.0)
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise pickle.UnpicklingError(f"Unsupported best_valid_score {score!r:.40}: not a number")


def _check_other_parameter(value: Any, model_class: type | None) -> None:
    """RecBole's ``load_other_parameter`` sets each entry as an attribute of the model: plain names only,
    never one the model's class defines (a method, a property) or a private one, and no callables."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise pickle.UnpicklingError(f"Unsupported other_parameter: a {type(value).__name__}, not a mapping")
    for key, item in value.items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_") or callable(item) \
                or hasattr(model_class, key):
            raise pickle.UnpicklingError(f"Unsupported other_parameter entry {key!r:.60}")


# Keys of a checkpoint's Config that would make RecBole unpickle a file (its saved dataset or dataloaders):
# a checkpoint is data, so they are cleared; a user may set them again with --key=value.
_PICKLE_PATH_KEYS = ("dataset_save_path", "dataloaders_save_path")
# Keys that would make RecBole write files, or send the run elsewhere, when a checkpoint is used: off.
_WRITE_KEYS = {"save_dataset": False, "save_dataloaders": False, "log_wandb": False, "allow_download": False}


def _distrust(config: Any, folder: str | None = None) -> None:
    """A checkpoint's Config, made safe to use: no pickle paths, nothing written where the user did not name.

    ``model`` and ``dataset`` become file and folder names (logs, data paths): a path in them would write
    or read elsewhere. Dataset and dataloader saving and wandb are off, and ``checkpoint_dir`` (which
    RecBole's trainer creates) is the checkpoint's own ``folder``, unless the user sets either again with
    ``--key=value``. Raises UnpicklingError (reported as a refusal) for a Config that is not one.
    """
    from recbole.config.configurator import Config

    final = getattr(config, "final_config_dict", None) if isinstance(config, Config) else None
    if not isinstance(final, dict):
        raise pickle.UnpicklingError(f"Unsupported config: a {type(config).__name__}, not a RecBole Config")
    _check_shape(config)
    for key in _PICKLE_PATH_KEYS:
        if final.get(key):
            final[key] = None
    final.update(_WRITE_KEYS)
    final["checkpoint_dir"] = folder or "saved"
    model, dataset = final.get("model"), final.get("dataset")
    if not isinstance(model, str) or model not in catalog.available_models():
        raise pickle.UnpicklingError(f"Unsupported config: model {model!r:.60} is not a known model")
    if not isinstance(dataset, str) or not dataset or any(c in dataset for c in "/\\\0") or dataset in (".", ".."):
        raise pickle.UnpicklingError(f"Unsupported config: dataset {dataset!r:.60} is not a dataset name")


# A Config's size: RecBole prints every value (init_logger, Config.__str__ loops over parameters x keys), so a
# pickle's shared references (a list of itself, twice, 60 deep) or a JSON of many keys would never print.
_MAX_KEYS = 10_000
_EXPANSION = 16  # a Config's values, printed out, may repeat shared objects this many times over


def _check_shape(config: Any) -> None:
    state = config.__dict__
    final, parameters = state.get("final_config_dict"), state.get("parameters")
    if not isinstance(parameters, dict) or not all(isinstance(names, list) for names in parameters.values()):
        raise pickle.UnpicklingError("Unsupported config: its parameters are not lists of names")
    if len(final) > _MAX_KEYS or sum(len(names) for names in parameters.values()) > _MAX_KEYS:
        raise pickle.UnpicklingError(f"Unsupported config: more than {_MAX_KEYS} keys")
    sizes: dict[int, int] = {}  # id -> the object's size written out, shared references repeated
    entered: set[int] = set()
    edges = 0  # references between distinct objects: a value's size written out stays near this when shared
    pending: list[tuple[Any, bool]] = [(value, False) for value in state.values()]
    while pending:
        value, children_done = pending.pop()
        if id(value) in sizes or not isinstance(value, (dict, list, tuple, set)):
            continue
        children = list(value.keys()) + list(value.values()) if isinstance(value, dict) else list(value)
        if not children_done:
            if id(value) in entered:
                raise pickle.UnpicklingError("Unsupported config: a value that contains itself")
            entered.add(id(value))
            pending.append((value, True))
            pending.extend((child, False) for child in children)
            continue
        edges += len(children)
        sizes[id(value)] = 1 + sum(sizes.get(id(child), 1) for child in children)
        if sizes[id(value)] > _EXPANSION * edges + 1000:
            raise pickle.UnpicklingError("Unsupported config: shared references that would print without end")


_OVERRIDES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("recbole_llm_overrides", default=None)


@contextlib.contextmanager
def config_overrides(overrides: dict | None) -> Iterator[None]:
    """While active, every checkpoint's Config loaded gets ``overrides`` (``recbole-llm evaluate/export
    --data_path=... --key=value``): a checkpoint evaluated or exported from another folder or machine."""
    token = _OVERRIDES.set(dict(overrides) if overrides else None)
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def apply_overrides(config: Any, overrides: dict | None) -> None:
    """Set ``overrides`` on a loaded Config the way RecBole reads them: command-line strings converted as
    RecBole converts its own command line, ``data_path`` as the folder holding the dataset's folder."""
    from recbole.config.configurator import Config

    if not overrides or not isinstance(config, Config):
        return
    from recbole_llm.patches.compat import check_config_values

    values = config._convert_config_dict(dict(overrides))
    for key, value in values.items():
        if key in ("model", "dataset", "device"):
            raise RecboleLLMError(f"--{key} cannot change for a checkpoint: it was trained with "
                                  f"{key}={config[key]!r}")
        if key == "data_path":
            value = os.path.join(os.fspath(value), config["dataset"])
        config.final_config_dict[key] = value
    check_config_values(config.final_config_dict)


def follow_this_machine(config: Any) -> None:
    """Point a checkpoint's ``Config`` at this machine: a CUDA device becomes the CPU where CUDA is absent.

    RecBole pickles the ``device`` its training machine chose (``Config._init_device``) and
    ``load_data_and_model`` moves the model there; on a CPU-only machine that is torch's "Attempting to
    deserialize object on a CUDA device". Mixed precision is already CUDA-only in the plugin trainer.
    """
    import torch
    from recbole.config.configurator import Config

    if not isinstance(config, Config) or torch.cuda.is_available():
        return
    final = getattr(config, "final_config_dict", None)
    device = final.get("device") if isinstance(final, dict) else None
    if isinstance(device, torch.device) and device.type == "cuda":
        final["device"] = torch.device("cpu")
        final["use_gpu"] = False
        final["gpu_id"] = ""


def follow_this_process(config: Any) -> None:
    """A checkpoint that DDP ranks trained, used outside a process group: one process's settings, so that
    RecBole builds its data with a plain sampler (its ``DistributedSampler`` fails without a process group)."""
    import torch.distributed as dist

    final = getattr(config, "final_config_dict", None)
    if isinstance(final, dict) and final.get("single_spec") is False and not (
            dist.is_available() and dist.is_initialized()):
        final.update(single_spec=True, world_size=1, nproc=1, local_rank=0)


def check_exists(path: str | os.PathLike) -> None:
    """A one-line error for a checkpoint path that is not a file (checked before anything heavy loads)."""
    if not os.path.isfile(os.fspath(path)):
        raise RecboleLLMError(
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
            raise RecboleLLMError(
                f"refusing to load '{path}': it references '{unsupported.group(1)}', which a RecBole "
                "checkpoint never holds; load only checkpoints saved by RecBole or recbole_llm"
            ) from None
        if str(error).startswith("Unsupported"):
            raise RecboleLLMError(
                f"refusing to load '{path}': it asks for an unsupported {str(error)[12:].strip()}; "
                "load only checkpoints saved by RecBole or recbole_llm"
            ) from None
        raise RecboleLLMError(
            f"'{path}' is not a RecBole checkpoint (unreadable pickle); "
            "pass the .pth file that RecBole's trainer saved under saved/"
        ) from None
    except RecboleLLMError:
        raise
    except (Exception, RecursionError) as error:  # torch's, pickle's, safetensors' and json's many ways
        detail = str(error).splitlines()[0][:160] if isinstance(error, ValueError) and str(error) else ""
        raise RecboleLLMError(
            f"'{path}' is not a RecBole checkpoint ({type(error).__name__}{': ' + detail if detail else ''}); "
            "pass the .pth file that RecBole's trainer saved under saved/"
        ) from None
    missing = {"config", "state_dict"} - set(checkpoint) if isinstance(checkpoint, dict) else {"config"}
    if missing:
        raise RecboleLLMError(
            f"'{path}' is not a RecBole checkpoint: it lacks {sorted(missing)}; "
            "pass the .pth file that RecBole's trainer saved under saved/"
        )
    return checkpoint


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


def explain_unfitting_weights(error: RuntimeError, path: str) -> RecboleLLMError | None:
    """torch's multi-line ``load_state_dict`` error as one line saying what does not match, else None."""
    text = str(error)
    if not text.startswith("Error(s) in loading state_dict"):
        return None
    details = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    first = details[0] if details else text.splitlines()[0]
    shapes = re.search(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
                       r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", first)
    if shapes:
        name, saved, here = shapes.groups()
        first = f"{name} is {saved} in the checkpoint but {here} here"
    elif len(first) > 200:
        first = first[:200] + " ..."
    return RecboleLLMError(
        f"checkpoint '{path}' does not fit the model built here: {first}; it was trained for another model or "
        "another dataset (item or user count): use the model, settings and data files it was trained with"
    )


def check_same_ids(trained_config: Any, config: Any, resume_file: str) -> None:
    """Refuse to resume on data whose ids differ from the data the checkpoint was trained on."""
    from recbole_llm.checkpoint import lineage as world

    trained, here = world.stored(trained_config), world.stored(config)
    if trained and here and trained["token_maps"] != here["token_maps"]:
        raise RecboleLLMError(
            f"resume_from '{resume_file}' was trained on data whose ids differ from this run's "
            f"('{config['dataset']}' at {config['data_path']}): its weights would score other items; "
            "resume on the data it was trained with"
        )


# ---------------------------------------------------------------------------------------------------------
# patch bodies (installed by recbole_llm.patches)


def wrap_load_data_and_model(original: Callable) -> Callable:
    """``load_data_and_model`` as :func:`load_for_use`: the checkpoint read once, safely."""

    @functools.wraps(original)
    def load_data_and_model(model_file):
        return load_for_use(model_file)

    return load_data_and_model


def wrap_resume_checkpoint(original: Callable) -> Callable:
    """``Trainer.resume_checkpoint`` reading the file once, safely; other data's ids and weights that do not
    fit refused in one line."""

    @functools.wraps(original)
    def resume_checkpoint(self, resume_file):
        with read_once(resume_file, map_location=self.device) as checkpoint:
            check_same_ids(checkpoint["config"], self.config, os.fspath(resume_file))
            try:
                return original(self, resume_file)
            except RuntimeError as error:
                explained = explain_unfitting_weights(error, os.fspath(resume_file))
                if explained is None:
                    raise
                raise explained from None

    return resume_checkpoint


def wrap_load_other_parameter(original: Callable) -> Callable:
    """``load_other_parameter`` setting only the attributes the model itself declares (``other_parameter_name``,
    what its ``other_parameter`` saves): a checkpoint naming any other would overwrite a setting or a method."""

    @functools.wraps(original)
    def load_other_parameter(self, para):
        if para is None:
            return original(self, para)
        declared = set(getattr(self, "other_parameter_name", ()) or ())
        if not isinstance(para, dict) or set(para) - declared:
            names = sorted(map(str, set(para) - declared)) if isinstance(para, dict) else [type(para).__name__]
            raise RecboleLLMError(
                f"refusing the checkpoint's other_parameter {names[:3]}: {type(self).__name__} keeps "
                f"{sorted(declared) or 'none'}; load only checkpoints saved by RecBole or recbole_llm for this model"
            )
        return original(self, para)

    return load_other_parameter


def wrap_evaluate(original: Callable) -> Callable:
    """``Trainer.evaluate(load_best_model=True)`` reading the best checkpoint once, safely."""

    @functools.wraps(original)
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not (eval_data and load_best_model):
            return original(self, eval_data, load_best_model, model_file, show_progress)
        with read_once(model_file or self.saved_model_file, map_location=self.device):
            return original(self, eval_data, load_best_model, model_file, show_progress)

    return evaluate
