"""The world a model was trained in: its token maps and a fingerprint of its data files.

A RecBole checkpoint pickles the ``Config`` but nothing of the dataset: evaluate and export rebuild the
item (and user) id maps from whatever atomic files are on disk, so files regenerated or changed since
training can silently point an item id at another item. :func:`record` keeps the maps and file digests on
the ``Config`` object (an attribute, not a config key: RecBole's log prints every key), so every
checkpoint, RecBole's trainer's and the plugin's, carries them; :func:`check` compares them with the data
on disk when a checkpoint's ``Config`` builds a dataset again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

from recbole_llm.errors import DataError

ATTRIBUTE = "recbole_llm_world"  # the Config attribute; one place for the name
# The checkpoint a run started from (init_from), on the Config like the world: {checkpoint, sha256, dataset,
# files, items, from: that checkpoint's own parent or None}
PARENT_ATTRIBUTE = "recbole_llm_parent"


def file_digest(path: str) -> str:
    """SHA-256 of the file at ``path``, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(dataset: Any) -> dict:
    """Token maps (index = internal id, ``[PAD]`` first) and sha256 of each atomic file of ``dataset``."""
    config = dataset.config
    files = {}
    folder = dataset.dataset_path
    for suffix in ("inter", "item", "user"):
        path = os.path.join(folder, f"{dataset.dataset_name}.{suffix}")
        if os.path.isfile(path):
            files[suffix] = file_digest(path)
    maps = {}
    for key in ("ITEM_ID_FIELD", "USER_ID_FIELD"):
        field = config[key]
        if field and field in dataset.field2id_token:
            maps[field] = [str(token) for token in dataset.field2id_token[field]]
    return {"token_maps": maps, "files": files}


def record(config: Any, dataset: Any) -> None:
    """Keep ``dataset``'s world on ``config`` (pickled with it into every checkpoint)."""
    setattr(config, ATTRIBUTE, describe(dataset))


def stored(config: Any) -> dict | None:
    """The world a checkpoint's ``Config`` was trained in, or None for checkpoints older than this."""
    world = getattr(config, ATTRIBUTE, None)
    return world if isinstance(world, dict) and "token_maps" in world else None


def record_parent(config: Any, parent: dict) -> None:
    """Keep the checkpoint this run started from (``init_from``) on ``config``: saved with every checkpoint."""
    setattr(config, PARENT_ATTRIBUTE, parent)


def parent(config: Any) -> dict | None:
    """The checkpoint a checkpoint's run started from (its lineage, nested by ``from``), or None."""
    value = getattr(config, PARENT_ATTRIBUTE, None)
    return value if isinstance(value, dict) else None


def check(trained: dict, dataset: Any) -> None:
    """Refuse data whose id maps differ from training; warn when only its files changed.

    Raises RecboleLLMError: the same token would mean another id (or the item count changed), so every
    score and every exported id would be wrong. A change that keeps the maps (new or removed interactions of
    known users and items) only changes what is evaluated: logged, then the run proceeds.
    """
    now = describe(dataset)
    for field, tokens in trained["token_maps"].items():
        here = now["token_maps"].get(field)
        if here == tokens:
            continue
        if here is None:
            raise DataError(f"the data at '{dataset.dataset_path}' has no '{field}' field, which the checkpoint "
                                  "was trained with: point data_path at the training data")
        first = next((i for i, (a, b) in enumerate(zip(tokens, here)) if a != b), min(len(tokens), len(here)))
        change = (f"{len(tokens) - 1} {field} tokens at training, {len(here) - 1} now" if len(tokens) != len(here)
                  else f"id {first} was '{tokens[first]}' at training, is '{here[first]}' now")
        raise DataError(
            f"the data at '{dataset.dataset_path}' is not what this checkpoint was trained on ({change}): its ids "
            "would point at other items; use the training data files (data_path), or retrain on the new data"
        )
    changed = sorted(k for k in set(trained["files"]) | set(now["files"]) if trained["files"].get(k) != now["files"].get(k))
    if changed:
        logging.getLogger().warning(
            f"the data files {', '.join(changed)} at '{dataset.dataset_path}' changed since training, but every "
            "user and item keeps its id: proceeding (results reflect the files as they are now)"
        )
