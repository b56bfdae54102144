"""What a loaded checkpoint may hold, checked before it is used: its Config distrusted (no pickle paths,
nothing written where the user did not name, a bounded size), the trainer's counters and the model's
``other_parameter``. :func:`recbole_llm.checkpoint.loading.safe_torch_load` runs them on every checkpoint it
loads; each refusal is a ``pickle.UnpicklingError``, reported as one line.
"""

from __future__ import annotations

import pickle
import re
from typing import Any

from recbole_llm.errors import CheckpointError, RecboleLLMError
from recbole_llm.model import catalog


# The trainer's counters in a checkpoint (RecBole's resume reads them): type and range.
# epoch -1: what RecBole 1.2.1's fit saves when a resumed run has no epoch left
_COUNTERS = {"epoch": (-1, 10**7), "cur_step": (0, 10**7), "global_step": (0, 10**12)}


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
    return CheckpointError(
        f"checkpoint '{path}' does not fit the model built here: {first}; it was trained for another model or "
        "another dataset (item or user count): use the model, settings and data files it was trained with"
    )
