"""metadata.json: its JSON Schema, the checks the runtime runs on it, and its agreement with the graph.

``format_version`` is checked on load: a runtime refuses an artifact of another format with the command that
re-exports it. The keys the runtime reads are checked by hand (:func:`check_metadata`), so that a serving
install needs no JSON Schema library and every refusal is one line. :func:`check_graph` holds metadata.json
against the graph's inputs, outputs and metadata_props, and its signature (:mod:`recbole_llm.artifact.files`).

``python -m recbole_llm.artifact.metadata > export/metadata.schema.json`` writes the schema out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recbole_llm.errors import ArtifactError, first_line, shown
from recbole_llm.artifact.files import _is_positive_int, check_signature, read_regular
from recbole_llm.artifact.spec import (FORMAT_VERSION, ITEM_VECTORS_FILE, MAX_LENGTH_LIMIT, MAX_TEXT_TOKENS,
                                       METADATA_DIGEST, PADDING_TOKEN, PRECISIONS, REEXPORT, SCORES,
                                       TEXT_TOWER_FILE, TOKENIZER_FILE, TOP_ITEMS, TOP_SCORES, USER_VECTORS,
                                       input_names)

# metadata.json's repeat_rate (share of next items already in the user's history, in the exported model's
# data) from which the served exclude_seen defaults to false: RecBole's evaluator counts a repeated item as a
# hit, and where users come back to items, dropping every seen item loses what the model was judged on
REPEAT_RATE_THRESHOLD = 0.05


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
                               "item_text_fields": names,
                               "text_model": {"type": "string", "description": "the sentence encoder the tower "
                                              "embeds text with (hub id or folder at export)"}},
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
            "lineage": {
                "type": ["object", "null"], "required": ["checkpoint", "sha256"],
                "description": "the checkpoint the exported model's training started from (init_from): its file "
                               "name, SHA-256, dataset, data files' SHA-256, item count, and its own lineage "
                               "under 'from'; null or absent: trained from scratch",
                "properties": {"checkpoint": {"type": "string"},
                               "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
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


if __name__ == "__main__":  # python -m recbole_llm.artifact.metadata > export/metadata.schema.json
    print(json.dumps(metadata_schema(), indent=2))
