"""A living catalogue (artifacts exported with ``--item-index``): items added by their text, and saved.

New items get their vectors from the artifact's text tower (:class:`TextTower`: ``tokenizer.json``, then
``text_tower.onnx``), from their text alone: a string, or ``{field: value}`` of the model's text fields, as
:meth:`Recommender.add_items <recbole_llm.serving.runtime.Recommender.add_items>` takes them, or from a
tab-separated items file (:func:`read_items_file`, ``recbole-llm add-items``). :func:`save` writes the grown
artifact atomically, its graph re-signed for the new item table, writers of one folder taking turns (a lock
file beside it). Adding items needs the ``tokenizers`` package.

:func:`add_items` and :func:`save` are :class:`~recbole_llm.serving.runtime.Recommender`'s methods of the same
names, kept here: they read and replace its catalogue and signed files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recbole_llm.errors import ArtifactError, InputError, ItemExistsError, RecboleLLMError, first_line, shown
from recbole_llm.artifact import spec
from recbole_llm.artifact.files import file_record, read_companion, read_regular, signed_graph
from recbole_llm.artifact.folder import atomic_folder
from recbole_llm.artifact.metadata import check_metadata
from recbole_llm.artifact.spec import REEXPORT
from recbole_llm.serving.records import Catalogue
from recbole_llm.serving.sessions import session_options
from recbole_llm.serving.tokens import is_token, valid_unicode

MAX_ITEM_TEXT_CHARS = 10_000  # characters of one new item's text (the tower reads its first max_tokens tokens)
MAX_TOKEN_CHARS = 1000  # characters of a new item's token
TEXT_CHUNK = 256  # item texts per text-tower call


def check_new_token(token: Any) -> str:
    """A new item's token as a string: non-empty, printable (no tab, newline or control character), no
    surrounding spaces (" 50" would be another item than "50"), valid Unicode, at most MAX_TOKEN_CHARS, and
    not the padding token; else InputError."""
    if not is_token(token) or not str(token):
        raise InputError(f"item token {shown(repr(token))} must be a non-empty string")
    text = str(token)
    if not valid_unicode(text) or not text.isprintable() or text != text.strip():
        raise InputError(f"item token '{shown(text)}' has surrounding spaces, a control character or a lone "
                              "surrogate; item tokens are printable text without surrounding spaces")
    if len(text) > MAX_TOKEN_CHARS:
        raise InputError(f"item token '{shown(text)}' is longer than {MAX_TOKEN_CHARS} characters")
    if text == spec.PADDING_TOKEN:
        raise InputError(f"'{spec.PADDING_TOKEN}' is the padding token (internal id 0), not an item; "
                              "choose another token")
    return text


def item_text(token: str, text: Any, fields: list[str]) -> str:
    """A new item's text, from a string or ``{field: value}`` of the model's text ``fields`` (joined by ", " in
    their order, as the model read them at training); else InputError naming the item."""
    if isinstance(text, Mapping):
        unknown = [name for name in text if name not in fields]
        if unknown:
            raise InputError(f"item '{shown(token)}': field '{shown(str(unknown[0]))}' is not one of the "
                                  f"model's text fields {fields}")
        if not all(isinstance(value, str) for value in text.values()):
            raise InputError(f"item '{shown(token)}': text field values must be strings")
        text = ", ".join(text[name].strip() for name in fields if name in text and text[name].strip())
    if not isinstance(text, str):
        raise InputError(f"item '{shown(token)}': its text must be a string or a mapping of {fields} to "
                              f"strings, not {type(text).__name__}")
    if not valid_unicode(text):
        raise InputError(f"item '{shown(token)}': its text holds a lone UTF-16 surrogate; send valid Unicode")
    if not text.strip():
        raise InputError(f"item '{shown(token)}' has no text; a new item's representation comes from its "
                              f"text ({', '.join(fields)})")
    if len(text) > MAX_ITEM_TEXT_CHARS:
        raise InputError(f"item '{shown(token)}': its text has {len(text)} characters, more than "
                              f"{MAX_ITEM_TEXT_CHARS}; shorten it")
    return text.strip()


class TextTower:
    """The artifact's text tower: item text to item vectors (its tokenizer, then ONNX Runtime)."""

    def __init__(self, folder: Path, tokenizer_json: bytes, tower: bytes, max_tokens: int, dim: int,
                 providers: Sequence[str], intra_op_threads: int | None):
        """The tokenizer and the ONNX Runtime session of the text tower in ``folder``, from their verified bytes
        (``tokenizer_json``, ``tower``): it truncates text at ``max_tokens`` tokens and returns vectors of ``dim``,
        run with ``providers`` and ``intra_op_threads`` (:func:`~recbole_llm.serving.sessions.session_options`)."""
        import onnxruntime as ort

        self.folder, self.dim = folder, dim

        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise InputError("adding items needs the tokenizers package: pip install tokenizers") from None
        try:
            tokenizer = Tokenizer.from_str(bytes(tokenizer_json).decode("utf-8"))
        except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ArtifactError(f"'{self.folder / spec.TOKENIZER_FILE}' is not a tokenizer "
                                         f"({first_line(error)}); {REEXPORT}") from None
        tokenizer.enable_truncation(max_tokens)  # as the model read item text
        options, _ = session_options(intra_op_threads)
        path = self.folder / spec.TEXT_TOWER_FILE
        try:
            session = ort.InferenceSession(bytes(tower), options, providers=list(providers))
        except Exception as error:  # noqa: BLE001
            raise ArtifactError(f"ONNX Runtime cannot load '{path}' ({first_line(error)}); "
                                         f"{REEXPORT}") from None
        inputs, want = sorted(node.name for node in session.get_inputs()), [s.name for s in spec.text_tower_specs()[0]]
        outputs = [node.name for node in session.get_outputs()]
        if inputs != sorted(want) or outputs != [spec.ITEM_VECTORS]:
            raise ArtifactError(f"'{path}' takes {inputs} and returns {outputs}, not a text tower's "
                                         f"{want} -> ['{spec.ITEM_VECTORS}']; {REEXPORT}")
        self.tokenizer, self.session = tokenizer, session

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        """Item vectors float32 [len(texts), dim] from item texts, through the artifact's text tower, in chunks
        of ``TEXT_CHUNK`` texts (memory stays flat however many items are added)."""
        tokenizer, session = self.tokenizer, self.session
        parts = []
        for start in range(0, len(texts), TEXT_CHUNK):
            encodings = tokenizer.encode_batch(list(texts[start : start + TEXT_CHUNK]))
            input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
            attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            try:
                (vectors,) = session.run([spec.ITEM_VECTORS], {spec.TEXT_INPUT_IDS: input_ids,
                                                                   spec.TEXT_ATTENTION_MASK: attention_mask})
            except Exception as error:  # noqa: BLE001 - ONNX Runtime's errors share no public base class
                raise ArtifactError(f"'{self.folder / spec.TEXT_TOWER_FILE}' fails on item text "
                                             f"({first_line(error)}); {REEXPORT}") from None
            if vectors.shape != (len(encodings), self.dim) or not np.isfinite(vectors).all():
                raise ArtifactError(f"'{self.folder / spec.TEXT_TOWER_FILE}' returned item vectors of "
                                             f"shape {list(vectors.shape)} or non-finite values; {REEXPORT}")
            parts.append(vectors.astype(np.float32))
        return np.concatenate(parts)


def add_items(recommender, items: Mapping[str, str | Mapping[str, str]]) -> list[int]:
    """:meth:`Recommender.add_items`: new items from their text, appended to ``recommender``'s catalogue
    (its item index too, with ``retrieval="ann"``) under its lock for writers; returns their internal ids."""
    if recommender.item_index is None:
        raise InputError("this artifact's item table is inside its graph: export it with --item-index to "
                              "add items")
    if not recommender.text_tower:
        raise InputError("this artifact's model has no item text (item_repr id), so a new item has no "
                              "representation: train with item_repr text or id+text to add items from text")
    if not isinstance(items, Mapping) or not items:
        raise InputError("items must be a non-empty mapping of new item tokens to their text, e.g. "
                              "{'1683': 'Toy Story 3 (2010), Animation Children'}")
    tokens, texts = [], []
    for token, text in items.items():
        token = check_new_token(token)
        if token in recommender.token_to_id:
            raise ItemExistsError(f"item '{shown(token)}' is already in the artifact (internal id "
                                  f"{recommender.token_to_id[token]}); new items need new tokens")
        if token in tokens:
            raise InputError(f"item '{shown(token)}' is given twice; give each new item once")
        tokens.append(token)
        texts.append(item_text(token, text, recommender.text_tower["item_text_fields"]))
    with recommender._adding:  # one writer at a time; readers keep using the table they started with
        if any(token in recommender.token_to_id for token in tokens):
            added = next(t for t in tokens if t in recommender.token_to_id)
            raise ItemExistsError(f"item '{shown(added)}' was added meanwhile; new items need new tokens")
        new = recommender.vectors_from_text(texts)
        old = recommender._catalogue
        first = len(old.tokens)
        token_to_id = dict(old.token_to_id)
        token_to_id.update({token: first + offset for offset, token in enumerate(tokens)})
        vectors = np.concatenate([old.vectors, new])
        if recommender._ann is not None:  # the index first: a call that finds these ids before it reads the
            recommender._ann.add(new)  # new catalogue drops them (past its table)
        recommender._catalogue = Catalogue(old.tokens + tokens, token_to_id, vectors)
    return list(range(first, first + len(tokens)))


def save(recommender, output: str | Path, replace: bool = False) -> Path:
    """:meth:`Recommender.save`: ``recommender``'s artifact, items added included, written to the folder
    ``output`` (:func:`recbole_llm.artifact.atomic_folder`) under a lock beside it; returns the folder."""
    if recommender.item_index is None:
        raise InputError("only an artifact exported with --item-index changes after export; nothing to save")
    output = Path(output).resolve()
    source = recommender.folder.resolve()
    if source in output.parents:
        raise InputError(f"'{output}' is inside the artifact '{source}'; choose a folder outside it")
    if output.exists() and not (replace and (output / spec.METADATA_FILE).is_file()):
        raise InputError(f"'{output}' exists; choose a new folder, or replace an artifact (save(..., "
                              "replace=True); recbole-llm add-items without --output)")
    tokens, _, vectors = recommender._catalogue
    folder = recommender.folder
    try:
        with _folder_lock(output):
            if output == source and changed_on_disk(recommender):
                raise InputError(f"'{output}' changed since it was loaded (another update wrote it); load "
                                      "it again and add the items again")
            # what was loaded, read again and checked against what was loaded: a file changed on disk
            # since (another writer, a hand edit) is refused, not copied under a new signature
            model = read_regular(folder / spec.MODEL_FILE)
            if file_record(model)["sha256"] != recommender._model_sha256:
                raise InputError(f"'{folder / spec.MODEL_FILE}' changed since it was loaded; load "
                                      "the artifact again and add the items again")
            signed_files = recommender.signed_files
            kept = {name: read_companion(folder, name, signed_files[name])
                    for name in (spec.TEXT_TOWER_FILE, spec.TOKENIZER_FILE) if name in signed_files}
            with atomic_folder(output) as staging:  # renamed into place when whole, else removed
                for name, data in kept.items():
                    (staging / name).write_bytes(data)
                np.save(staging / spec.ITEM_VECTORS_FILE, vectors, allow_pickle=False)
                table = read_regular(staging / spec.ITEM_VECTORS_FILE)
                files = {name: file_record(data) for name, data in kept.items()}
                files[spec.ITEM_VECTORS_FILE] = file_record(table)
                del table
                metadata = dict(recommender.metadata, item_tokens=tokens, n_items=len(tokens))
                metadata["item_index"] = dict(recommender.item_index,
                                              sha256=files[spec.ITEM_VECTORS_FILE]["sha256"])
                metadata["items_added"] = (recommender.metadata.get("items_added", 0) + len(tokens)
                                           - len(recommender.metadata["item_tokens"]))
                check_metadata(metadata, staging / spec.METADATA_FILE)
                # the graph signs the grown catalogue: its metadata_props are rewritten, the graph kept as it is
                signed = signed_graph(model, metadata, files)
                (staging / spec.MODEL_FILE).write_bytes(signed)
                (staging / spec.METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
    except OSError as error:
        raise InputError(f"could not write '{output}': {error.strerror or error}; nothing was changed; "
                              "choose a writable folder") from None
    if output == source:  # what is on disk now is this artifact
        recommender.metadata, recommender.item_index = metadata, metadata["item_index"]
        recommender.signed_files = files
        recommender._model_sha256 = file_record(signed)["sha256"]
    return output


def changed_on_disk(recommender) -> bool:
    """Whether the item table on disk is not the one ``recommender`` loaded (another update wrote it)."""
    try:
        on_disk = json.loads(bytes(read_regular(recommender.folder / spec.METADATA_FILE)))
        return on_disk["item_index"]["sha256"] != recommender.item_index["sha256"]
    except (OSError, ValueError, KeyError, TypeError, RecboleLLMError):
        return True


def _folder_lock(output: Path):
    """An exclusive lock on ``.<name>.lock`` beside ``output`` (fcntl; a no-op where fcntl is missing)."""
    import contextlib

    @contextlib.contextmanager
    def held():
        try:
            import fcntl
        except ImportError:  # not POSIX
            yield
            return
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output.parent / f".{output.name}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    return held()


def read_items_file(path: str | Path, fields: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
    """New items from a tab-separated file with a header (RecBole's .item format works: ``item_id:token``,
    ``movie_title:token_seq`` ...): the first column is the item token, the others its fields; with
    ``fields`` (the model's text fields) only those columns are kept, and the header must name one.
    Returns ``{token: {field: value}}`` for :meth:`Recommender.add_items`; RecboleLLMError for an unreadable
    file, no header or rows, a row of another width, or a token listed twice (naming the line)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise InputError(f"items file '{path}' is not a regular file; pass a tab-separated file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or first_line(error)
        raise InputError(f"cannot read items file '{path}' ({reason}); pass a UTF-8 tab-separated file") from None
    # lines end at \n (or \r\n) only: a title may hold other characters Python counts as line breaks
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    rows = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if len(rows) < 2:
        raise InputError(f"items file '{path}' needs a header (item token, then text fields, tab-separated) "
                              "and at least one item")
    header = [name.split(":")[0].strip() for name in rows[0][1].split("\t")]
    if len(header) < 2 or not all(header):
        raise InputError(f"items file '{path}', line {rows[0][0]}: the header must name the item token column "
                              "and at least one text field, tab-separated, e.g. item_id<TAB>movie_title<TAB>class")
    twice = next((name for i, name in enumerate(header) if name in header[:i]), None)
    if twice is not None:
        raise InputError(f"items file '{path}', line {rows[0][0]}: column '{shown(twice)}' is named twice")
    if fields is not None and not set(header[1:]) & set(fields):
        raise InputError(f"items file '{path}': the header names none of the model's text fields "
                              f"{list(fields)} (it has {header[1:]}); name the text columns as the model's item file did")
    items: dict[str, dict[str, str]] = {}
    for number, line in rows[1:]:
        values = line.split("\t")
        if len(values) != len(header):
            raise InputError(f"items file '{path}', line {number}: {len(values)} tab-separated values, the "
                                  f"header has {len(header)}")
        token = values[0].strip()
        try:
            check_new_token(token)
        except RecboleLLMError as error:
            raise InputError(f"items file '{path}', line {number}: {error}") from None
        if token in items:
            raise InputError(f"items file '{path}', line {number}: item '{shown(token)}' is listed twice")
        items[token] = {name: value for name, value in zip(header[1:], values[1:])
                        if fields is None or name in fields}
    return items
