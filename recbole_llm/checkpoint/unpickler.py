"""The restricted unpickler RecBole's checkpoints are read through, and its allow-lists.

A checkpoint is a file a user may download, and unpickling runs code. This is Python's documented way of
restricting globals (a ``pickle.Unpickler`` whose ``find_class`` accepts an allow-list), handed to
``torch.load`` as its ``pickle_module`` (:data:`restricted_pickle`; :func:`recbole_llm.checkpoint.loading.
safe_torch_load` does). The allow-list is torch's own weights-only list plus exactly the classes RecBole's
checkpoints contain.
"""

from __future__ import annotations

import enum
import functools
import io
import pickle
import types
from typing import Any, Callable

from recbole_llm.model import catalog


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
