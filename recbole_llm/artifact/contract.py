"""The artifact contract: what ``recbole-llm export`` writes and the runtime, the service and Triton read.

One place for the artifact's file names, the graph's input and output names, dtypes and shapes, the
metadata schema (``format_version`` checked on load), and the numpy post-processing of a graph that scores
every item. The graph builder, the validator, the Triton writer and :mod:`recbole_llm.serving.runtime` all use
it. Imports numpy only: serving installs need neither torch nor RecBole.

The graph (``FORMAT_VERSION`` 2):

- inputs ``item_seq`` int64 [batch, length]: internal item ids, most recent last, right-padded with 0;
  ``item_length`` int64 [batch]: real items per row; with ``top_k`` also ``exclude_items`` int64
  [batch, excluded]: ids never to return, 0-padded (the user's whole history when seen items are
  excluded, which may be longer than the model's window of ``max_length`` items);
- outputs, with ``top_k``: ``top_items`` int64 and ``top_scores`` float32 [batch, top_k] (best first,
  ``-inf`` scores where fewer items were left); without: ``scores`` float32 [batch, n_items] (column 0 is
  padding, never an item).

An artifact with an item index (``recbole-llm export --item-index``, plugin models) keeps the item table out
of the graph, so that items can be added after training and a catalogue can be searched by an index:

- the graph takes a third input ``item_vectors`` float32 [n_items, hidden] (row 0 padding) and returns
  ``user_vectors`` float32 [batch, hidden]; item i scores ``user_vectors @ item_vectors[i]``;
- ``item_vectors.npy`` holds the table (metadata.json's ``item_index``: file, dim and SHA-256);
- for models with item text, ``text_tower.onnx`` (inputs ``input_ids``, ``attention_mask`` int64 [items,
  tokens]; output ``item_vectors`` [items, hidden]: a new item's row from its text alone) and the
  tokenizer's ``tokenizer.json`` (metadata.json's ``text_tower``).

Every file vouched for by the graph (:func:`signed_graph`, :func:`check_signature`): ``model.onnx``'s
metadata_props hold metadata.json's keys, ``metadata_sha256`` (SHA-256 of metadata.json's canonical JSON:
every key, sorted, so reformatting is harmless and any edited value is refused) and ``files`` (each
companion file's size and SHA-256: ``item_vectors.npy``, ``text_tower.onnx``, ``tokenizer.json``). Export
writes them, ``add-items`` writes them again for the catalogue it saves, and the runtime checks them all at
load. Companion files are looked at with ``os.stat`` first: anything but a regular file of the recorded size
(a FIFO, a device such as ``/dev/zero``, a directory) is refused before it is opened.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recbole_llm.errors import RecboleLLMError

# 2: top-k graphs take exclude_items (every item of the raw history) instead of format 1's exclude_seen
# bool, which could only drop the items inside the model's window.
FORMAT_VERSION = 2
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
TRITON_FOLDER = "triton"
PADDING_TOKEN = "[PAD]"  # item_tokens[0]: internal id 0 is padding, never an item
MAX_LENGTH_LIMIT = 1 << 16  # items per history a graph may take (metadata.json's max_length)
PRECISIONS = ("fp32", "int8", "fp16")
MAX_TEXT_TOKENS = 4096  # tokens per item text a text tower may take (metadata.json's text_tower.max_tokens)
REEXPORT = ("export the artifact again: recbole-llm export --checkpoint CHECKPOINT --output FOLDER --force "
            "(then recbole-llm add-items again for items added since)")

# model.onnx's metadata_props that vouch for the other files (see the module docstring)
METADATA_DIGEST, FILES_DIGEST = "metadata_sha256", "files"
# metadata.json's repeat_rate (share of next items already in the user's history, in the exported model's
# data) from which the served exclude_seen defaults to false: RecBole's evaluator counts a repeated item as a
# hit, and where users come back to items, dropping every seen item loses what the model was judged on
REPEAT_RATE_THRESHOLD = 0.05

ITEM_SEQ, ITEM_LENGTH, EXCLUDE_ITEMS = "item_seq", "item_length", "exclude_items"
SCORES, TOP_ITEMS, TOP_SCORES = "scores", "top_items", "top_scores"
# artifacts with an item index (export --item-index)
ITEM_VECTORS, USER_VECTORS = "item_vectors", "user_vectors"
ITEM_VECTORS_FILE = "item_vectors.npy"
TEXT_TOWER_FILE, TOKENIZER_FILE = "text_tower.onnx", "tokenizer.json"
TEXT_INPUT_IDS, TEXT_ATTENTION_MASK = "input_ids", "attention_mask"


class ArtifactError(RecboleLLMError):
    """An artifact that does not keep the contract: unreadable, inconsistent, or of another format."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ``shape`` holds names for dynamic axes and ints for fixed ones."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[str | int, ...]
    doc: str


def input_specs(top_k: int | None, vectors: bool = False) -> list[TensorSpec]:
    """The graph's inputs, in order (``vectors``: an artifact with an item index)."""
    specs = [
        TensorSpec(ITEM_SEQ, "int64", ("batch", "length"), "internal item ids, most recent last, right-padded with 0"),
        TensorSpec(ITEM_LENGTH, "int64", ("batch",), "real items per row, 1 ... length"),
    ]
    if vectors:
        specs.append(TensorSpec(ITEM_VECTORS, "float32", ("items", "hidden"),
                                "every item's vector (item_vectors.npy, items added since included); row 0 padding"))
    elif top_k is not None:
        specs.append(TensorSpec(EXCLUDE_ITEMS, "int64", ("batch", "excluded"),
                                "item ids never to return, 0-padded (the whole history to exclude seen items)"))
    return specs


def output_specs(top_k: int | None, n_items: int, vectors: bool = False) -> list[TensorSpec]:
    """The graph's outputs, in order; ``n_items`` counts the padding column."""
    if vectors:
        return [TensorSpec(USER_VECTORS, "float32", ("batch", "hidden"),
                           "each history's vector: item i scores user_vectors @ item_vectors[i]")]
    if top_k is None:
        return [TensorSpec(SCORES, "float32", ("batch", n_items), "every item's score; column 0 is padding")]
    return [TensorSpec(TOP_ITEMS, "int64", ("batch", top_k), "internal ids of the best items, best first"),
            TensorSpec(TOP_SCORES, "float32", ("batch", top_k), "their scores; -inf where fewer items were left")]


def input_names(top_k: int | None, vectors: bool = False) -> list[str]:
    return [spec.name for spec in input_specs(top_k, vectors)]


def output_names(top_k: int | None, vectors: bool = False) -> list[str]:
    return [spec.name for spec in output_specs(top_k, 0, vectors)]


def text_tower_specs() -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of ``text_tower.onnx``: item text, tokenized, to the items' vectors."""
    return ([TensorSpec(TEXT_INPUT_IDS, "int64", ("items", "tokens"), "token ids (tokenizer.json), 0-padded"),
             TensorSpec(TEXT_ATTENTION_MASK, "int64", ("items", "tokens"), "1 on real tokens")],
            [TensorSpec(ITEM_VECTORS, "float32", ("items", "hidden"), "each item's vector from its text alone")])


def feeds(item_seq: np.ndarray, item_length: np.ndarray, exclude_items: np.ndarray | None = None,
          top_k: int | None = None) -> dict[str, np.ndarray]:
    """The inputs of one graph call; a top-k graph without ``exclude_items`` excludes nothing."""
    out = {ITEM_SEQ: np.asarray(item_seq, dtype=np.int64), ITEM_LENGTH: np.asarray(item_length, dtype=np.int64)}
    if top_k is not None:
        out[EXCLUDE_ITEMS] = (np.zeros((len(out[ITEM_SEQ]), 1), dtype=np.int64) if exclude_items is None
                              else np.asarray(exclude_items, dtype=np.int64))
    return out


# ---------------------------------------------------------------------------------------------------------
# post-processing: what a top-k graph does inside, for graphs that return every item's score


def exclusions(seen: Sequence[np.ndarray], exclude_seen: Sequence[bool]) -> np.ndarray:
    """The graph's ``exclude_items`` input, int64 [rows, n] 0-padded: each row's whole history where
    ``exclude_seen`` is set, nothing (a padding column) where it is not."""
    rows = [ids if flag else ids[:0] for ids, flag in zip(seen, exclude_seen)]
    out = np.zeros((len(rows), max([1, *(len(r) for r in rows)])), dtype=np.int64)
    for row, ids in enumerate(rows):
        out[row, : len(ids)] = ids
    return out


def item_scores(user_vectors: np.ndarray, item_vectors: np.ndarray) -> np.ndarray:
    """Every item's score, float32 [rows, n_items], from an item-index graph's ``user_vectors`` [rows, hidden]
    and the table ``item_vectors`` [n_items, hidden]: the product the scoring graphs compute inside."""
    return np.asarray(user_vectors, dtype=np.float32) @ np.asarray(item_vectors, dtype=np.float32).T


def top_k(scores: np.ndarray, k: int, exclude_items: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(top_items int64, top_scores float32), each [rows, k], from ``scores`` [rows, n_items]: padding and
    ``exclude_items`` (int64 [rows, n], 0-padded) score ``-inf``; ties keep the lower id first.

    Large catalogues take a partial sort (``np.argpartition``: linear in the items, not n log n) whose answer
    is the full stable sort's, ties at the k-th score included."""
    scores = np.asarray(scores, dtype=np.float32).copy()
    if exclude_items is not None:
        np.put_along_axis(scores, exclude_items, -np.inf, axis=1)  # column 0 absorbs the padding
    scores[:, 0] = -np.inf
    if k >= scores.shape[1] or scores.shape[1] <= PARTIAL_SORT_FROM:
        items = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    else:
        items = np.empty((len(scores), k), dtype=np.int64)
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, best, axis=1).min(axis=1)  # the k-th best score of each row
        for row, (row_scores, threshold) in enumerate(zip(scores, kth)):
            above = np.flatnonzero(row_scores > threshold)  # fewer than k: all of them are in
            above = above[np.lexsort((above, -row_scores[above]))]  # best first, then lower id
            tied = np.flatnonzero(row_scores == threshold)[: k - len(above)]  # lowest ids first
            items[row] = np.concatenate([above, tied])
    return items.astype(np.int64), np.take_along_axis(scores, items, axis=1)


PARTIAL_SORT_FROM = 4096  # items from which top_k partially sorts


# ---------------------------------------------------------------------------------------------------------
# metadata.json


def metadata_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of metadata.json; ``export/metadata.schema.json`` is this, written out."""
    integer = {"type": "integer"}
    names = {"type": "array", "items": {"type": "string"}}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/recbole-llm/recbole_llm/export/metadata.schema.json",
        "title": "recbole_llm artifact metadata",
        "description": f"metadata.json of an artifact written by recbole-llm export, format {FORMAT_VERSION}",
        "type": "object",
        "required": ["format_version", "max_length", "item_tokens", "n_items", "top_k", "inputs", "outputs",
                     "precision", "model", "dataset"],
        "properties": {
            "format_version": {"const": FORMAT_VERSION},
            "model": {"type": "string", "description": "the RecBole model name"},
            "dataset": {"type": "string"},
            "checkpoint": {"type": "string", "description": "file name of the exported checkpoint"},
            "exported_at": {"type": "string", "format": "date-time"},
            "max_length": {**integer, "minimum": 1, "maximum": MAX_LENGTH_LIMIT,
                           "description": "items the model reads per history (the most recent)"},
            "n_items": {**integer, "minimum": 2, "description": "len(item_tokens), padding included"},
            "top_k": {"type": ["integer", "null"], "minimum": 1,
                      "description": "items the graph returns; null: it returns every item's score"},
            "precision": {"enum": list(PRECISIONS)},
            "optimized": {"type": "boolean"},
            "fused_operators": {"type": "object", "additionalProperties": integer},
            "adapters_merged": {"type": "boolean"},
            "item_repr": {"type": "string"},
            "item_index": {
                "type": ["object", "null"], "required": ["file", "dim", "sha256"],
                "description": "present when the graph returns user vectors and the item table is a file",
                "properties": {"file": {"const": ITEM_VECTORS_FILE}, "dim": {**integer, "minimum": 1},
                               "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
            },
            "text_tower": {
                "type": ["object", "null"], "required": ["file", "tokenizer", "max_tokens", "item_text_fields"],
                "description": "item text to item vectors, for items added after training",
                "properties": {"file": {"const": TEXT_TOWER_FILE}, "tokenizer": {"const": TOKENIZER_FILE},
                               "max_tokens": {**integer, "minimum": 1, "maximum": MAX_TEXT_TOKENS},
                               "item_text_fields": names},
            },
            "repeat_rate": {
                "type": ["number", "null"], "minimum": 0, "maximum": 1,
                "description": "share of next items already in the user's history, over the exported model's "
                               "data (RecBole's evaluator counts such an item as a hit); null: no next items",
            },
            "exclude_seen": {
                "type": "boolean",
                "description": "the served default for exclude_seen: false where repeat_rate is at least "
                               f"{REPEAT_RATE_THRESHOLD}, else true; absent: true",
            },
            "inputs": {**names, "minItems": 2, "maxItems": 3},
            "outputs": {**names, "minItems": 1, "maxItems": 2},
            "versions": {"type": "object"},
            "validation": {"type": "array", "items": {"type": "object", "required": ["precision", "passed"]}},
            "item_tokens": {
                "type": "array", "minItems": 2, "uniqueItems": True, "prefixItems": [{"const": PADDING_TOKEN}],
                "items": {"type": "string"},
                "description": "internal item id -> raw item token; index 0 is padding",
            },
        },
    }


def check_metadata(metadata: Any, path: str | Path) -> dict[str, Any]:
    """``metadata`` (parsed metadata.json) if it keeps the contract; else ArtifactError naming ``path``, the
    first problem and the fix. The keys the runtime reads are checked by hand, so that a serving install
    needs no JSON Schema library and every refusal is one line."""
    if not isinstance(metadata, dict):
        raise ArtifactError(f"'{path}' holds a JSON {type(metadata).__name__}, not an object; {REEXPORT}")
    for key in ("max_length", "item_tokens"):
        if key not in metadata:
            raise ArtifactError(f"'{path}' has no '{key}'; {REEXPORT}")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        why = (" (format 1 artifacts drop only the items inside the model's window when excluding seen items)"
               if version == 1 else "")
        raise ArtifactError(f"'{path}' is artifact format {version!r:.20}, this runtime reads format "
                            f"{FORMAT_VERSION}{why}; {REEXPORT}")

    def positive_int(key: str) -> bool:
        value = metadata[key]
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if not positive_int("max_length") or metadata["max_length"] > MAX_LENGTH_LIMIT:
        raise ArtifactError(f"'{path}': max_length must be an integer from 1 to {MAX_LENGTH_LIMIT}, not "
                            f"{metadata['max_length']!r:.60}; {REEXPORT}")
    tokens = metadata["item_tokens"]
    if not isinstance(tokens, list) or len(tokens) < 2:
        what = f"{len(tokens)} entries" if isinstance(tokens, list) else type(tokens).__name__
        raise ArtifactError(f"'{path}': item_tokens must be a list of padding then item tokens (strings), not "
                            f"{what}; {REEXPORT}")
    strange = next((i for i, token in enumerate(tokens) if type(token) is not str), None)
    if strange is not None:
        raise ArtifactError(f"'{path}': item_tokens[{strange}] is {type(tokens[strange]).__name__} "
                            f"{tokens[strange]!r:.40}, not a string; {REEXPORT}")
    if len(set(tokens[1:])) != len(tokens) - 1:
        seen: set[str] = set()
        twice = next(token for token in tokens[1:] if token in seen or seen.add(token))
        raise ArtifactError(f"'{path}': item token '{shown(twice)}' is listed twice in item_tokens; {REEXPORT}")
    if metadata.get("top_k") is not None and (not positive_int("top_k") or metadata["top_k"] >= len(tokens)):
        raise ArtifactError(f"'{path}': top_k must be null or an integer from 1 to {len(tokens) - 1} (the "
                            f"items), not {metadata['top_k']!r:.60}; {REEXPORT}")
    if tokens[0] != PADDING_TOKEN:
        raise ArtifactError(f"'{path}': item_tokens[0] is '{shown(tokens[0])}', not the padding '{PADDING_TOKEN}' "
                            f"(internal id 0); {REEXPORT}")
    for key in ("n_items", "top_k", "model", "dataset", "precision", "inputs", "outputs"):
        if key not in metadata:
            raise ArtifactError(f"'{path}' has no '{key}'; {REEXPORT}")
    if metadata["n_items"] != len(tokens):
        raise ArtifactError(f"'{path}' says n_items={metadata['n_items']!r:.60} but lists {len(tokens)} "
                            f"item_tokens; {REEXPORT}")
    for key in ("model", "dataset"):
        if type(metadata[key]) is not str:
            raise ArtifactError(f"'{path}': {key} must be a string, not {metadata[key]!r:.60}; {REEXPORT}")
    if metadata["precision"] not in PRECISIONS:
        raise ArtifactError(f"'{path}': precision must be one of {', '.join(PRECISIONS)}, not "
                            f"{metadata['precision']!r:.60}; {REEXPORT}")
    for key in ("inputs", "outputs"):  # what they must be is checked against the graph (check_graph)
        if not isinstance(metadata[key], list) or not all(type(name) is str for name in metadata[key]):
            raise ArtifactError(f"'{path}': {key} must be a list of tensor names, not {metadata[key]!r:.80}; "
                                f"{REEXPORT}")
    rate = metadata.get("repeat_rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1):
        raise ArtifactError(f"'{path}': repeat_rate must be null or a number from 0 to 1, not {rate!r:.40}; {REEXPORT}")
    if not isinstance(metadata.get("exclude_seen", True), bool):
        raise ArtifactError(f"'{path}': exclude_seen must be true or false, not {metadata['exclude_seen']!r:.40}; "
                            f"{REEXPORT}")
    _check_item_index(metadata, path)
    return metadata


def served_exclude_seen(repeat_rate: float | None) -> bool:
    """The served default for exclude_seen, from the data's repeat rate: drop seen items unless users come
    back to items (at least REPEAT_RATE_THRESHOLD of next items repeat one of the history)."""
    return repeat_rate is None or repeat_rate < REPEAT_RATE_THRESHOLD


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_item_index(metadata: dict[str, Any], path: str | Path) -> None:
    """``item_index`` and ``text_tower``: absent or null, or naming the contract's own files (never a path)."""
    index, tower = metadata.get("item_index"), metadata.get("text_tower")
    added = metadata.get("items_added", 0)
    if isinstance(added, bool) or not isinstance(added, int) or added < 0:
        raise ArtifactError(f"'{path}': items_added must be a non-negative integer, not {added!r:.40}; {REEXPORT}")
    if index is not None:
        if not isinstance(index, dict) or index.get("file") != ITEM_VECTORS_FILE:
            raise ArtifactError(f"'{path}': item_index must be an object with file '{ITEM_VECTORS_FILE}', not "
                                f"{index!r:.80}; {REEXPORT}")
        if not _is_positive_int(index.get("dim")):
            raise ArtifactError(f"'{path}': item_index.dim must be a positive integer, not "
                                f"{index.get('dim')!r:.40}; {REEXPORT}")
        if not isinstance(index.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", index["sha256"]):
            raise ArtifactError(f"'{path}': item_index.sha256 must be 64 hex digits; {REEXPORT}")
        if metadata.get("top_k") is not None:
            raise ArtifactError(f"'{path}': an artifact with an item_index ranks in the runtime: top_k must be "
                                f"null; {REEXPORT}")
    if tower is not None:
        if index is None:
            raise ArtifactError(f"'{path}' has a text_tower but no item_index to add its items to; {REEXPORT}")
        if (not isinstance(tower, dict) or tower.get("file") != TEXT_TOWER_FILE
                or tower.get("tokenizer") != TOKENIZER_FILE):
            raise ArtifactError(f"'{path}': text_tower must be an object with file '{TEXT_TOWER_FILE}' and "
                                f"tokenizer '{TOKENIZER_FILE}', not {tower!r:.80}; {REEXPORT}")
        tokens = tower.get("max_tokens")
        if not _is_positive_int(tokens) or tokens > MAX_TEXT_TOKENS:
            raise ArtifactError(f"'{path}': text_tower.max_tokens must be an integer from 1 to {MAX_TEXT_TOKENS}, "
                                f"not {tokens!r:.40}; {REEXPORT}")
        fields = tower.get("item_text_fields")
        if not isinstance(fields, list) or not all(type(field) is str for field in fields):
            raise ArtifactError(f"'{path}': text_tower.item_text_fields must be a list of field names; {REEXPORT}")


def sha256_of(path: str | Path) -> str:
    """The file's SHA-256, hex; only a regular file is opened (:func:`read_regular`'s checks)."""
    return hashlib.sha256(read_regular(path)).hexdigest()


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular(path: str | Path, size: int | None = None) -> os.stat_result:
    """``os.stat(path)`` (a link is followed) if it is a regular file of ``size`` bytes (any size when None);
    else ArtifactError naming the file, what it is and the fix. Nothing is opened: a FIFO or a device is
    refused before anything could block on it or read it without end."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        what = " (a link to nothing)" if os.path.islink(path) else ""
        raise ArtifactError(f"'{path}' is missing{what}; copy the whole artifact folder, or {REEXPORT}") from None
    except OSError as error:
        raise ArtifactError(f"cannot look at '{path}' ({error.strerror or error}); {REEXPORT}") from None
    if not stat.S_ISREG(info.st_mode):
        link = " (through a link)" if os.path.islink(path) else ""
        raise ArtifactError(f"'{path}' is {_kind(info.st_mode)}{link}, not a regular file; an artifact's files are "
                            f"regular files: copy the whole artifact folder, or {REEXPORT}")
    if size is not None and info.st_size != size:
        raise ArtifactError(f"'{path}' has {info.st_size} bytes, not the {size} its model.onnx was signed with "
                            f"(truncated, or from another export or update); {REEXPORT}")
    return info


def read_regular(path: str | Path, size: int | None = None) -> bytearray:
    """The bytes of ``path``, a regular file of ``size`` bytes (:func:`check_regular` first); opened without
    blocking and checked again once open, so a file swapped for a FIFO meanwhile is refused, not waited on."""
    path = Path(path)
    expected = check_regular(path, size).st_size
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        raise ArtifactError(f"cannot read '{path}' ({error.strerror or error}); check its permissions") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode) or info.st_size != expected:
            raise ArtifactError(f"'{path}' changed while it was opened (now {_kind(info.st_mode)} of "
                                f"{info.st_size} bytes); load the artifact again once it is written")
        data = bytearray(expected)
        view, done = memoryview(data), 0
        with os.fdopen(descriptor, "rb", buffering=0, closefd=False) as handle:
            while done < expected:
                got = handle.readinto(view[done:])
                if not got:
                    break
                done += got
            if done != expected or handle.read(1):
                raise ArtifactError(f"'{path}' changed size while it was read; load the artifact again once it "
                                    "is written")
    except OSError as error:
        raise ArtifactError(f"cannot read '{path}' ({error.strerror or error}); {REEXPORT}") from None
    finally:
        os.close(descriptor)
    return data


def file_record(data: bytes) -> dict[str, Any]:
    """What the graph records of one companion file: its size and SHA-256."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def companion_files(metadata: dict[str, Any]) -> list[str]:
    """The files besides model.onnx and metadata.json that ``metadata`` says the artifact has."""
    names = [ITEM_VECTORS_FILE] if metadata.get("item_index") is not None else []
    if metadata.get("text_tower") is not None:
        names += [TEXT_TOWER_FILE, TOKENIZER_FILE]
    return names


def metadata_digest(metadata: dict[str, Any]) -> str:
    """SHA-256 of metadata.json's meaning: every key and value as canonical JSON (keys sorted, no spaces,
    ASCII), so a reformatted file keeps its digest and any changed value does not."""
    canonical = json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def signed_graph(model: bytes, metadata: dict[str, Any], files: dict[str, dict[str, Any]]) -> bytes:
    """``model`` (a serialized ONNX ModelProto) with its metadata_props replaced by ``metadata``'s keys (JSON
    values, strings as they are), ``metadata_sha256`` and ``files`` (``{name: file_record}`` of every companion
    file): what export and add-items write. Edits the protobuf at its top level, so serving installs need no
    onnx package: every other field is kept byte for byte."""
    if sorted(files) != sorted(companion_files(metadata)):
        raise ArtifactError(f"signing records {sorted(files)} but the metadata names {companion_files(metadata)}")
    props = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    props[METADATA_DIGEST] = metadata_digest(metadata)
    props[FILES_DIGEST] = json.dumps(files, sort_keys=True)
    kept = bytearray()
    for number, start, end in _top_level_fields(model):
        if number != _METADATA_PROPS_FIELD:
            kept += model[start:end]
    for key, value in props.items():
        entry = _length_delimited(1, key.encode("utf-8")) + _length_delimited(2, value.encode("utf-8"))
        kept += _length_delimited(_METADATA_PROPS_FIELD, entry)
    return bytes(kept)


_METADATA_PROPS_FIELD = 14  # onnx.proto: ModelProto.metadata_props, repeated StringStringEntryProto {1: key, 2: value}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _top_level_fields(data: bytes):
    """(field number, start, end) of each top-level field of a serialized protobuf message."""

    def varint(position: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            if position >= len(data) or shift > 63:
                raise ArtifactError(f"model.onnx is not a protobuf message (a varint runs past its end); {REEXPORT}")
            byte = data[position]
            value |= (byte & 0x7F) << shift
            position, shift = position + 1, shift + 7
            if not byte & 0x80:
                return value, position

    position = 0
    while position < len(data):
        start = position
        tag, position = varint(position)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, position = varint(position)
        elif wire == 1:
            position += 8
        elif wire == 2:
            length, position = varint(position)
            position += length
        elif wire == 5:
            position += 4
        else:
            raise ArtifactError(f"model.onnx holds a protobuf wire type {wire} at byte {start}; {REEXPORT}")
        if position > len(data):
            raise ArtifactError(f"model.onnx is truncated (a field runs past its end); {REEXPORT}")
        yield number, start, position


def check_signature(graph_metadata: dict[str, str], metadata: dict[str, Any], model_path: str | Path,
                    metadata_path: str | Path) -> dict[str, dict[str, Any]]:
    """metadata.json is the one ``model.onnx`` was signed with (``metadata_sha256``), and the graph's ``files``
    names the companion files metadata.json names; returns ``{name: {"bytes", "sha256"}}`` of those files
    (:func:`read_companion` checks each). Else ArtifactError naming the file and the fix."""
    if METADATA_DIGEST not in graph_metadata or FILES_DIGEST not in graph_metadata:
        raise ArtifactError(f"'{model_path}' does not vouch for '{metadata_path}' and its companion files (no "
                            f"'{METADATA_DIGEST}' in its metadata_props: exported by an earlier recbole_llm, or "
                            f"re-saved by another tool); {REEXPORT}")
    try:
        digest = metadata_digest(metadata)
    except (ValueError, RecursionError, TypeError):  # nested past what can be written back
        digest = None
    if graph_metadata[METADATA_DIGEST] != digest:
        raise ArtifactError(f"'{metadata_path}' is not the metadata '{model_path}' was signed with (a value differs: "
                            f"edited by hand, or from another export or update); {REEXPORT}")
    try:
        files = json.loads(graph_metadata[FILES_DIGEST])
        valid = isinstance(files, dict) and all(
            isinstance(record, dict) and _is_positive_int(record.get("bytes")) and isinstance(record.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", record["sha256"]) for record in files.values())
    except (ValueError, RecursionError):
        valid = False
    if not valid:
        raise ArtifactError(f"'{model_path}': its metadata_props' '{FILES_DIGEST}' is not a record of file sizes and "
                            f"SHA-256 digests; {REEXPORT}")
    if sorted(files) != sorted(companion_files(metadata)):
        raise ArtifactError(f"'{model_path}' was signed with files {sorted(files)} but '{metadata_path}' names "
                            f"{companion_files(metadata)}; {REEXPORT}")
    return files


def read_companion(folder: str | Path, name: str, record: dict[str, Any]) -> bytearray:
    """The bytes of the companion file ``name``: a regular file of the recorded size (looked at before it is
    opened) whose SHA-256 is the recorded one; else ArtifactError naming the file and the fix."""
    path = Path(folder) / name
    data = read_regular(path, record["bytes"])
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ArtifactError(f"'{path}' is not the file its model.onnx was signed with (SHA-256 differs: edited, or "
                            f"from another export or update); {REEXPORT}")
    return data


def read_item_vectors(folder: str | Path, metadata: dict[str, Any], record: dict[str, Any]) -> np.ndarray:
    """``item_vectors.npy`` of an artifact with an item index: float32 [n_items, dim], read once
    (:func:`read_companion`: a regular file of the signed size and SHA-256), then checked against metadata.json
    (its SHA-256, its shape, a zero padding row, finite values); else ArtifactError."""
    path = Path(folder) / ITEM_VECTORS_FILE
    index = metadata["item_index"]
    want = (len(metadata["item_tokens"]), index["dim"])
    if record["sha256"] != index["sha256"]:
        raise ArtifactError(f"'{path}' is not the item table metadata.json describes (SHA-256 differs): the files "
                            f"come from different exports or updates; {REEXPORT}")
    data = read_companion(folder, ITEM_VECTORS_FILE, record)
    try:
        handle = io.BytesIO(data)
        version = np.lib.format.read_magic(handle)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(handle)
    except (ValueError, EOFError) as error:
        raise ArtifactError(f"'{path}' is not a numpy array file ({first_line(error)}); {REEXPORT}") from None
    if dtype != np.dtype(np.float32) or tuple(shape) != want or fortran:
        raise ArtifactError(f"'{path}' holds {dtype} {list(shape)}, not float32 {list(want)} (one row per item "
                            f"token); {REEXPORT}")
    offset = handle.tell()
    if len(data) - offset != want[0] * want[1] * 4:
        raise ArtifactError(f"'{path}' has {len(data) - offset} bytes of values, not {want[0] * want[1] * 4}; "
                            f"{REEXPORT}")
    vectors = np.frombuffer(data, dtype="<f4", offset=offset).reshape(want).astype(np.float32, copy=False)
    if not np.isfinite(vectors).all() or np.any(vectors[0]):
        raise ArtifactError(f"'{path}' has non-finite values or a non-zero padding row; {REEXPORT}")
    return vectors


def replace_folder(staging: Path, output: Path) -> None:
    """Move the finished folder ``staging`` to ``output`` (a sibling), replacing what is there: readers see
    the old folder or the new one, never a mix; a leftover of a killed run is removed by the next one."""
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")  # named so remove_leftovers finds it
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output)


def remove_leftovers(output: Path) -> None:
    """Staging and swap folders of writes to ``output`` whose process is gone (killed mid-write); a swapped-out
    artifact whose writer died between its two renames is put back, not removed."""
    for leftover in sorted(output.parent.glob(f".{output.name}.*")):
        match = re.fullmatch(rf"\.{re.escape(output.name)}\.(partial|old)-(\d+)(?:-.*)?", leftover.name)
        if match is None or not leftover.is_dir():
            continue
        pid = int(match.group(2))
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            if match.group(1) == "old" and not output.exists():
                os.replace(leftover, output)
            else:
                shutil.rmtree(leftover, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass


def staging_folder(output: Path) -> Path:
    """A new, empty folder beside ``output`` to write into before :func:`replace_folder`."""
    import tempfile

    output.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{os.getpid()}-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact is an ordinary folder
    return staging


def read_metadata(path: str | Path) -> dict[str, Any]:
    """metadata.json, read and checked (:func:`check_metadata`)."""
    path = Path(path)
    data = read_regular(path)  # a FIFO or a device is refused, not waited on or read without end
    try:
        metadata = json.loads(bytes(data))
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, huge numbers
        raise ArtifactError(f"'{path}' is not JSON ({first_line(error)}); {REEXPORT}") from None
    return check_metadata(metadata, path)


GRAPH_METADATA_KEYS = ("max_length", "top_k", "n_items", "item_tokens")  # also in model.onnx's metadata_props


def check_graph(inputs: Sequence[str], outputs: dict[str, Sequence[Any]], graph_metadata: dict[str, str],
                metadata: dict[str, Any], model_path: str | Path, metadata_path: str | Path
                ) -> dict[str, dict[str, Any]]:
    """The graph's input names, output names and shapes, the keys export also wrote into the graph's
    metadata_props, and its signature (:func:`check_signature`) agree with metadata.json; else ArtifactError
    naming the disagreement. Returns the signed companion files, ``{name: {"bytes", "sha256"}}``."""
    top, n_tokens = metadata.get("top_k"), len(metadata["item_tokens"])
    vectors = metadata.get("item_index") is not None
    if vectors:
        if USER_VECTORS not in outputs:
            raise ArtifactError(f"'{metadata_path}' has an item_index but '{model_path}' returns no "
                                f"'{USER_VECTORS}' (outputs: {', '.join(outputs)}); {REEXPORT}")
        width = outputs[USER_VECTORS][1] if len(outputs[USER_VECTORS]) == 2 else None
        if isinstance(width, int) and width != metadata["item_index"]["dim"]:
            raise ArtifactError(f"'{metadata_path}' has item vectors of dim {metadata['item_index']['dim']} but "
                                f"'{model_path}' returns user vectors of {width}; {REEXPORT}")
    elif USER_VECTORS in outputs:
        raise ArtifactError(f"'{model_path}' returns user vectors (exported with --item-index) but "
                            f"'{metadata_path}' has no item_index; {REEXPORT}")
    elif TOP_ITEMS in outputs and TOP_SCORES in outputs:
        if top is None:
            raise ArtifactError(f"'{model_path}' returns top-k items (exported with --top-k) but "
                                f"'{metadata_path}' has top_k null; {REEXPORT}")
        width = outputs[TOP_ITEMS][1] if len(outputs[TOP_ITEMS]) == 2 else None
        if isinstance(width, int) and width != top:
            raise ArtifactError(f"'{metadata_path}' has top_k={top} but '{model_path}' returns {width} items; "
                                f"{REEXPORT}")
    elif SCORES in outputs:
        if top is not None:
            raise ArtifactError(f"'{model_path}' scores every item (exported without --top-k) but "
                                f"'{metadata_path}' has top_k={top}; {REEXPORT}")
        width = outputs[SCORES][1] if len(outputs[SCORES]) == 2 else None
        if isinstance(width, int) and width != n_tokens:
            raise ArtifactError(f"'{metadata_path}' lists {n_tokens} item_tokens but '{model_path}' scores "
                                f"{width} items; the two files come from different exports: {REEXPORT}")
    else:
        raise ArtifactError(f"'{model_path}' has neither a '{SCORES}' output nor '{TOP_ITEMS}' and '{TOP_SCORES}' "
                            f"(outputs: {', '.join(outputs)}); it is not a recbole_llm export: {REEXPORT}")
    wanted = input_names(top, vectors)
    if sorted(inputs) != sorted(wanted):
        raise ArtifactError(f"'{model_path}' takes inputs {', '.join(inputs)}, not {', '.join(wanted)}; it is not "
                            f"a recbole_llm export: {REEXPORT}")
    # The graph's own record of what it was exported with: without it, a metadata.json edited or paired with
    # another export (other item order, another max_length) would load and answer wrongly, silently.
    graph: dict[str, Any] = {}
    for key in GRAPH_METADATA_KEYS:
        try:
            graph[key] = json.loads(graph_metadata[key])
        except (KeyError, ValueError, RecursionError):
            raise ArtifactError(
                f"'{model_path}' does not say which {key} it was exported with (its metadata_props lack a JSON "
                f"'{key}': re-saved by another tool, or not a recbole_llm export), so '{metadata_path}' cannot be "
                f"checked against it; {REEXPORT}") from None
    if METADATA_DIGEST not in graph_metadata:  # before comparing: an old graph's keys may be stale (add-items)
        check_signature(graph_metadata, metadata, model_path, metadata_path)
    said = {"max_length": metadata["max_length"], "top_k": top, "n_items": n_tokens}
    for key, value in said.items():
        if graph[key] != value:
            what = f"{n_tokens} item_tokens" if key == "n_items" else f"{key}={value!r}"
            raise ArtifactError(f"'{metadata_path}' has {what} but '{model_path}' was exported with "
                                f"{key}={graph[key]!r:.60}; the two files come from different exports: {REEXPORT}")
    if graph["item_tokens"] != metadata["item_tokens"]:
        raise ArtifactError(f"'{metadata_path}' lists other item_tokens than '{model_path}' was exported with; "
                            f"the two files come from different exports, or it was edited: {REEXPORT}")
    return check_signature(graph_metadata, metadata, model_path, metadata_path)


# ---------------------------------------------------------------------------------------------------------
# one-line messages


def shown(text: str, limit: int = 60) -> str:
    """``text`` for an error message: one line, encodable (control characters and lone surrogates escaped),
    at most ``limit`` characters and a count."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return shown(lines[0] if lines else type(error).__name__, 300)


if __name__ == "__main__":  # python -m recbole_llm.artifact.contract > export/metadata.schema.json
    print(json.dumps(metadata_schema(), indent=2))
