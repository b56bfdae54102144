"""The artifact's names and shapes: file names, format constants, and the graph's inputs and outputs.

What ``recbole-llm export`` writes and the runtime, the service and Triton read (``FORMAT_VERSION`` 2):

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

Imports numpy only: serving installs need neither torch nor RecBole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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

# model.onnx's metadata_props that vouch for the other files (:mod:`recbole_llm.artifact.files`)
METADATA_DIGEST, FILES_DIGEST = "metadata_sha256", "files"

ITEM_SEQ, ITEM_LENGTH, EXCLUDE_ITEMS = "item_seq", "item_length", "exclude_items"
SCORES, TOP_ITEMS, TOP_SCORES = "scores", "top_items", "top_scores"
# artifacts with an item index (export --item-index)
ITEM_VECTORS, USER_VECTORS = "item_vectors", "user_vectors"
ITEM_VECTORS_FILE = "item_vectors.npy"
TEXT_TOWER_FILE, TOKENIZER_FILE = "text_tower.onnx", "tokenizer.json"
TEXT_INPUT_IDS, TEXT_ATTENTION_MASK = "input_ids", "attention_mask"


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
