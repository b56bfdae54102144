"""The artifact's files: read safely, and vouched for by the graph's signature.

Every file is vouched for by the graph (:func:`signed_graph`, :func:`check_signature`): ``model.onnx``'s
metadata_props hold metadata.json's keys, ``metadata_sha256`` (SHA-256 of metadata.json's canonical JSON:
every key, sorted, so reformatting is harmless and any edited value is refused) and ``files`` (each
companion file's size and SHA-256: ``item_vectors.npy``, ``text_tower.onnx``, ``tokenizer.json``). Export
writes them, ``add-items`` writes them again for the catalogue it saves, and the runtime checks them all at
load. Companion files are looked at with ``os.stat`` first: anything but a regular file of the recorded size
(a FIFO, a device such as ``/dev/zero``, a directory) is refused before it is opened.

Imports numpy only; the signature is written by editing the protobuf at its top level, so serving installs
need no onnx package.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from recbole_llm.errors import ArtifactError, first_line
from recbole_llm.artifact.spec import (FILES_DIGEST, ITEM_VECTORS_FILE, METADATA_DIGEST, REEXPORT, TEXT_TOWER_FILE,
                                       TOKENIZER_FILE)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


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
