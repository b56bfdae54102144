"""The plugin's checkpoint format: one safetensors file, no pickle anywhere in it.

RecBole's trainer ``torch.save``\\ s a dict holding a pickled ``Config`` (``{"config", "epoch", "cur_step",
"best_valid_score", "state_dict", "other_parameter", "optimizer"}``); reading such a file means running a
pickle, which only an allow-list makes safe. The plugin's trainer writes the same dict as data instead:

- every tensor, wherever it sits in the dict (weights, optimizer moments, random-number states), is a
  tensor of a `safetensors <https://huggingface.co/docs/safetensors>`_ file, named by its place
  (``state_dict/item_embedding.weight``, ``optimizer/state/0/exp_avg``);
- everything else, the ``Config`` included, is JSON in the file's header metadata (key
  :data:`FORMAT_KEY`), with tagged values for what JSON lacks (tuples, devices, RecBole's enums).

Reading one never unpickles: safetensors parses the header and tensors, ``json`` the rest, and the
``Config`` is rebuilt from its state with ``object.__new__`` (its constructor, which evaluates strings, is
never called). The file keeps RecBole's ``.pth`` name, so it goes wherever RecBole expects a checkpoint
path: ``load_data_and_model``, ``resume_from``, ``Trainer.evaluate`` (:mod:`recbole_llm.checkpoint.loading` routes
RecBole's ``torch.load`` here).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import tempfile
from typing import Any

from recbole_llm.model import catalog
from recbole_llm.errors import CheckpointError

FORMAT_KEY = "recbole_llm.checkpoint"  # the safetensors metadata key holding the JSON
# SHA-256 of that JSON and every tensor's bytes: a flipped bit that still parses is caught on load.
# Files written before it have none and load as they are.
DIGEST_KEY = "recbole_llm.checkpoint.sha256"
FORMAT_VERSION = 1
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on a header
# The JSON beside the tensors: a Config with the id maps of a few million users and items fits.
_JSON_LIMIT = 64 * 1024 * 1024
# What a trainer's checkpoint holds: RecBole's keys, and the plugin trainer's -latest.pth additions.
_FIELDS = {"config", "epoch", "cur_step", "best_valid_score", "state_dict", "other_parameter", "optimizer",
           "best_model_file", "best_valid_result", "scheduler", "scaler", "global_step", "random_state"}


def is_pickle_free(path: str | os.PathLike) -> bool:
    """Whether ``path`` (a regular file) starts like a safetensors file: an 8-byte length, then ``{``."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= _HEADER_LIMIT and head[8:9] == b"{"


# ---------------------------------------------------------------------------------------------------------
# values <-> JSON


def _enum_classes() -> dict[str, type]:
    from recbole.utils import enum_type

    return {cls.__name__: cls for cls in (enum_type.ModelType, enum_type.InputType, enum_type.EvaluatorType,
                                          enum_type.FeatureType, enum_type.FeatureSource)}


class _Encoder:
    """A checkpoint dict as JSON-able data plus a flat ``{name: tensor}`` for safetensors."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.tensors: dict[str, Any] = {}
        self.storages: set[tuple[int, int]] = set()
        self.enums = {cls: name for name, cls in _enum_classes().items()}

    def tensor(self, value: Any, place: str) -> dict:
        name = place or "tensor"
        while name in self.tensors:  # names come from keys, which may repeat once joined
            name += "_"
        tensor = value.detach().to("cpu").contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key in self.storages:  # safetensors refuses tensors sharing memory
            tensor = tensor.clone()
        self.storages.add(key)
        self.tensors[name] = tensor
        return {"__tensor__": name}

    def encode(self, value: Any, place: str = "") -> Any:
        torch = self.torch
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.Tensor):
            return self.tensor(value, place)
        if isinstance(value, torch.device):
            return {"__device__": str(value)}
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if type(value) in self.enums:
            return {"__enum__": self.enums[type(value)], "value": value.value}
        if hasattr(value, "dtype") and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            return value.item()  # a numpy scalar
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, f"{place}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{place}/{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: self.encode(v, f"{place}/{k}".lstrip("/")) for k, v in value.items()}
            return {"__items__": [[self.encode(k, place), self.encode(v, f"{place}/{k}".lstrip("/"))]
                                  for k, v in value.items()]}
        raise CheckpointError(
            f"cannot save a checkpoint holding a {type(value).__name__} at '{place or '/'}': the plugin's "
            "checkpoints hold tensors, numbers, strings, lists and dicts; keep other values out of the config"
        )


def _decode(value: Any, tensors: dict[str, Any], used: set[str]) -> Any:
    """The inverse of :meth:`_Encoder.encode`; any tag it does not know is refused."""
    import torch

    if isinstance(value, list):
        return [_decode(v, tensors, used) for v in value]
    if not isinstance(value, dict):
        return value
    tags = [key for key in value if key.startswith("__")]
    if not tags:
        return {k: _decode(v, tensors, used) for k, v in value.items()}
    tag = tags[0]
    if set(value) - {tag, "value"}:  # a tagged value is the tag (and an enum's value), nothing beside it
        raise ValueError(f"malformed value {tag} with other keys")
    if tag == "__tensor__" and isinstance(value[tag], str) and value[tag] in tensors:
        used.add(value[tag])
        return tensors[value[tag]]
    if tag == "__tuple__" and isinstance(value[tag], list):
        return tuple(_decode(v, tensors, used) for v in value[tag])
    if tag == "__items__" and isinstance(value[tag], list) and all(
            isinstance(pair, list) and len(pair) == 2 for pair in value[tag]):
        return {_decode(k, tensors, used): _decode(v, tensors, used) for k, v in value[tag]}
    if tag == "__device__" and isinstance(value[tag], str):
        return torch.device(value[tag])
    if tag == "__dtype__" and isinstance(getattr(torch, str(value[tag]), None), torch.dtype):
        return getattr(torch, value[tag])
    if tag == "__enum__":
        cls = _enum_classes().get(value[tag])
        if cls is not None and value.get("value") in cls._value2member_map_:
            return cls._value2member_map_[value["value"]]
    raise ValueError(f"unknown or malformed value {tag}")


# ---------------------------------------------------------------------------------------------------------
# the Config


_NOT_STATE = ("yaml_loader", "model_class")  # classes: rebuilt, not stored


def encode_config(config: Any, encoder: _Encoder) -> dict:
    """A RecBole ``Config`` as data: its attributes, and its model class by module and name."""
    model_class = config.__dict__.get("model_class")
    state = {k: v for k, v in config.__dict__.items() if k not in _NOT_STATE}
    return {"__config__": encoder.encode(state, "config"),
            "model_class": f"{model_class.__module__}:{model_class.__qualname__}" if model_class else None}


def decode_config(data: Any, tensors: dict, used: set) -> Any:
    """A ``Config`` rebuilt from :func:`encode_config`'s data without calling its constructor."""
    import yaml
    from recbole.config.configurator import Config

    if not isinstance(data, dict) or not isinstance(data.get("__config__"), dict):
        raise ValueError("config is not a Config's state")
    state = _decode(data["__config__"], tensors, used)
    model_class = None
    if data.get("model_class") is not None:
        module, _, name = str(data["model_class"]).partition(":")
        model_class = catalog.recommender_class(module, name)
        if model_class is None:
            raise ValueError(f"model class {data['model_class']!r:.80} is not a RecBole or plugin model")
    config = object.__new__(Config)
    config.__dict__.update(state)
    config.__dict__.update(yaml_loader=yaml.FullLoader, model_class=model_class)
    return config


# ---------------------------------------------------------------------------------------------------------
# files


def content_digest(text: str, tensors: dict) -> str:
    """SHA-256 (hex) of a checkpoint's JSON ``text`` and its ``tensors`` (name -> tensor): names in order, each
    with its dtype, shape and raw bytes, so any change to a value, a name or a layout changes it."""
    import hashlib

    import torch

    digest = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, not a copy
    return digest.hexdigest()


def to_bytes(state: dict) -> bytes:
    """``state`` (a trainer's checkpoint dict, ``config`` a RecBole ``Config``) as safetensors bytes."""
    from safetensors.torch import save

    encoder = _Encoder()
    data = {key: encode_config(value, encoder) if key == "config" else encoder.encode(value, key)
            for key, value in state.items()}
    text = json.dumps({"version": FORMAT_VERSION, "checkpoint": data})
    return save(encoder.tensors, metadata={FORMAT_KEY: text, DIGEST_KEY: content_digest(text, encoder.tensors)})


def atomic_save(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to a temporary file beside ``path``, then rename: ``path`` is always a whole checkpoint.

    Raises RecboleLLMError (one line) when the file cannot be written, e.g. a full disk; whatever fails,
    Ctrl-C included, the temporary file is removed and the previous checkpoint, if any, is unchanged.
    """
    path = os.fspath(path)
    blob = to_bytes(state)
    partial = None
    try:
        # a new file of its own (O_EXCL: never an existing name or a link someone left there)
        descriptor, partial = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial",
                                               dir=os.path.dirname(os.path.abspath(path)))
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(descriptor, 0o666 & ~umask)  # what open() would give, not mkstemp's owner-only mode
        with os.fdopen(descriptor, "wb") as f:  # a full disk surfaces as OSError(ENOSPC), here or at fsync
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException as error:
        if partial is not None:
            with contextlib.suppress(OSError):
                os.remove(partial)
        if not isinstance(error, OSError):
            raise
        reason = "no space left on the device" if error.errno == errno.ENOSPC else error.strerror or str(error)
        raise CheckpointError(
            f"could not write checkpoint '{path}': {reason}; free space or set checkpoint_dir to "
            "another folder (the previous checkpoint, if any, is unchanged)"
        ) from None


def load(path: str | os.PathLike, map_location: Any = None) -> dict:
    """A checkpoint written by :func:`atomic_save`, with tensors on ``map_location`` (a device or its name;
    anything else: the CPU). Raises CheckpointError (one line) for a file changed since it was saved, and
    ValueError for a file that is not one (the caller words the error)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if FORMAT_KEY not in metadata:
        raise ValueError("a safetensors file without a recbole_llm checkpoint header")
    if len(metadata[FORMAT_KEY]) > _JSON_LIMIT:
        raise ValueError(f"a header over {_JSON_LIMIT >> 20} MiB")
    tensors = load_file(path)  # on the CPU: checked there, then moved
    # the digest first: a damaged file is called damaged, whichever of its parts the damage reached
    if DIGEST_KEY in metadata and content_digest(metadata[FORMAT_KEY], tensors) != metadata[DIGEST_KEY]:
        raise CheckpointError(f"'{path}' is damaged: its contents do not match the SHA-256 saved with them; "
                              "copy it again or use another checkpoint")
    header = json.loads(metadata[FORMAT_KEY])
    if not isinstance(header, dict) or header.get("version") != FORMAT_VERSION \
            or not isinstance(header.get("checkpoint"), dict):
        raise ValueError(f"checkpoint format version {header.get('version') if isinstance(header, dict) else '?'}"
                         f" is not {FORMAT_VERSION}")
    unknown = set(header["checkpoint"]) - _FIELDS
    if unknown:
        raise ValueError(f"fields a trainer never writes: {sorted(unknown)[:3]}")
    device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
    if str(device) != "cpu":
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    used: set[str] = set()
    checkpoint = {key: decode_config(value, tensors, used) if key == "config" else _decode(value, tensors, used)
                  for key, value in header["checkpoint"].items()}
    if set(tensors) - used:
        raise ValueError(f"tensors no field refers to: {sorted(set(tensors) - used)[:3]}")
    return checkpoint
