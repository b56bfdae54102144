"""Atomic files, datasets and saved dataloaders: RecBole 1.2.1's reading of a dataset, each body wrapping a
RecBole function rather than copying it (:mod:`recbole_llm.patches` installs them, each naming the RecBole
line it answers):

- A dataset that is not on disk makes RecBole prompt for a download on standard input, which hangs
  offline and in CI. It becomes a one-line error saying where RecBole looked.
- ``Dataset._dataframe_to_interaction`` turns the time field into float32 before histories are sorted by it:
  Unix seconds round to 128 s, so close events kept file-row order (RUCAIBox/RecBole#2204). It stays float64.
- An atomic file's bad header, missing id or time field, or bad row fails in one line naming file, line and
  fix, not deep in pandas.
- A saved dataset or saved dataloaders are unpickled only from the file the user named.

``Dataset._download`` is here rather than with today's stack (:mod:`recbole_llm.patches.stack`): its prompt
is how RecBole looks for a dataset, on any stack, and its error names the atomic files this module reads.
"""

from __future__ import annotations

import functools
import os

from recbole_llm.config import ALIAS_KEYS
from recbole_llm.errors import DataError, shown


def wrap_download(original):
    """``Dataset._download``: a dataset not on disk is a one-line error, not a prompt on standard input."""

    @functools.wraps(original)
    def _download(self):
        name, path = self.dataset_name, os.path.abspath(self.dataset_path)
        if self.config["allow_download"] and self._get_download_url("url", allow_none=True):
            return original(self)
        known = self._get_download_url("url", allow_none=True) is not None
        fix = (
            f"put RecBole atomic files ({name}.inter, ...) in '{path}' or set data_path to the folder "
            f"that holds '{name}/'"
        )
        if known:
            fix += " (RecBole can download it: set allow_download=True)"
        raise DataError(f"dataset '{name}' not found: no folder '{path}'; {fix}")

    return _download


_TYPES = "token, token_seq, float, float_seq"


def _atomic_header(path: str, separator: str, encoding: str) -> list[tuple[str, str]]:
    """The ``name:type`` fields of a RecBole atomic file's header, or a one-line error naming the fix."""
    from recbole.utils import FeatureType

    encoding = encoding or "utf-8"
    with open(path, "rb") as f:
        first = f.readline()
        has_rows = any(line.strip() for line in (f.readline(), f.readline()))
    try:
        head = first.decode(encoding).lstrip("\ufeff").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: line 1 is not {encoding} text (byte {error.start}): save the file as "
                              f"{encoding} or set encoding") from None
    if not head.strip():
        raise DataError(f"{path} is empty: its first line must name the fields as name:type ({_TYPES}), "
                              "one row per line after it")
    fields = []
    for column, field_type in enumerate(head.split(separator), start=1):
        name, colon, kind = field_type.partition(":")
        if not colon:
            raise DataError(f"{path}: header field {column} '{field_type}' has no type: write "
                                  f"'{field_type}:token' (types: {_TYPES})")
        if kind not in {t.value for t in FeatureType}:
            raise DataError(f"{path}: header field '{field_type}' has the unknown type '{kind}': use one of "
                                  f"{_TYPES}")
        earlier = next((number for number, (seen, _) in enumerate(fields, start=1) if seen == name), None)
        if earlier is not None:
            raise DataError(f"{path}: the header names '{name}' twice (fields {earlier} and {column}): rename "
                                  "or remove one of the columns")
        fields.append((name, kind))
    if not has_rows:
        raise DataError(f"{path} has a header but no rows: add the data, one row per line")
    return fields


def _field_limit() -> int:
    import csv

    return csv.field_size_limit()


def _locate_bad_row(path: str, separator: str, encoding: str, fields: list[tuple[str, str]]) -> str:
    """Where a file RecBole could not read goes wrong: the first undecodable line, field longer than the CSV
    reader takes (RecBole reads with pandas' python engine: Python's ``csv`` module and its field limit),
    unclosed quote or non-number."""
    encoding = encoding or "utf-8"
    limit = _field_limit()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode(encoding).rstrip("\r\n")
            except UnicodeDecodeError as error:
                return f"line {number} is not {encoding} text (byte {error.start} of the line): save it as {encoding}"
            if number == 1:
                continue
            values = line.split(separator)
            for (name, _), value in zip(fields, values):
                if len(value) > limit:
                    return (f"line {number}, field '{name}' is {len(value):,} characters long, over the {limit:,} "
                            "the reader takes: shorten it (or leave the column out with load_col)")
                if value.startswith('"') and (len(value) < 2 or not value.endswith('"')):  # quoted, not closed
                    return (f"line {number}, field '{name}' has an unclosed quote (\"), which makes the reader take "
                            "the lines after it as one field: remove the quote or double it (\"\")")
            for (name, kind), value in zip(fields, values):
                if kind == "float" and value.strip():
                    try:
                        float(value)
                    except ValueError:
                        return f"line {number}, field '{name}' (float): {value[:40]!r} is not a number"
    return ""


def _orders_by_time(dataset, source) -> bool:
    """Whether RecBole orders this interaction file's histories by time (sequential models, order TO)."""
    from recbole.utils import FeatureSource, ModelType

    eval_args = dataset.config["eval_args"] or {}
    if dataset.config["benchmark_filename"]:  # pre-split files hold each history as an ordered item list
        return False
    return (
        source in (FeatureSource.INTERACTION, FeatureSource.INTERACTION.value)
        and bool(dataset.time_field)
        and dataset.config["MODEL_TYPE"] == ModelType.SEQUENTIAL
        and (eval_args.get("order") or "TO") == "TO"
    )


def wrap_load_feat(original):
    """``Dataset._load_feat``: an atomic file's header, id fields and bad rows in one line naming the fix."""
    from recbole.utils import FeatureSource

    @functools.wraps(original)
    def _load_feat(self, filepath, source):
        load_col, _ = self._get_load_and_unload_col(source)
        if load_col == set():  # RecBole does not read this file
            return original(self, filepath, source)
        separator, encoding = self.config["field_separator"], self.config["encoding"]
        fields = _atomic_header(filepath, separator, encoding)
        names = {name for name, _ in fields}
        needed = {
            FeatureSource.INTERACTION: [("USER_ID_FIELD", self.uid_field), ("ITEM_ID_FIELD", self.iid_field)],
            FeatureSource.USER: [("USER_ID_FIELD", self.uid_field)],
            FeatureSource.ITEM: [("ITEM_ID_FIELD", self.iid_field)],
        }.get(source, [])
        for key, field in needed:
            if field and field not in names:
                raise DataError(f"{filepath} has no '{field}' field: add a '{field}:token' column, or set "
                                      f"{key} to the name of your id field")
        if _orders_by_time(self, source) and self.time_field not in names:
            raise DataError(
                f"{filepath} has no '{self.time_field}' field, which sequential models order each history by: "
                f"add a '{self.time_field}:float' column (the position in the user's history will do), or set "
                "TIME_FIELD to yours"
            )
        with open(filepath, "rb") as f:
            bom = f.read(3) == b"\xef\xbb\xbf"
        if bom and str(encoding or "utf-8").lower().replace("_", "-") in ("utf-8", "utf8"):
            # a UTF-8 byte-order mark (Excel, Notepad) would become part of the first field's name
            self.config["encoding"] = "utf-8-sig"
        try:
            return original(self, filepath, source)
        except (ValueError, UnicodeDecodeError):
            where = _locate_bad_row(filepath, separator, encoding, fields)
            if not where:
                raise
            raise DataError(f"{filepath}: {where}") from None
        finally:
            self.config["encoding"] = encoding

    return _load_feat


def wrap_dataframe_to_interaction(original):
    """``Dataset._dataframe_to_interaction`` keeps the time field at float64.

    RecBole reads every ``float`` field at float64 and converts it to ``torch.FloatTensor`` (float32, 24
    significant bits) here, before ``Dataset.build`` and ``SequentialDataset.data_augmentation`` sort each
    history by it: Unix seconds (about 1.7e9) are then rounded to multiples of 128 s, and events closer than
    that fall back to file-row order (RUCAIBox/RecBole#2204). The time field becomes a float64 tensor (exact
    for integers up to 2**53: seconds, milliseconds and microseconds since 1970); the other float fields stay
    as RecBole makes them.
    """
    import numpy as np
    import torch
    from recbole.utils import FeatureType

    @functools.wraps(original)
    def _dataframe_to_interaction(self, data):
        interaction = original(self, data)
        field = self.time_field
        if field and field in data and self.field2type.get(field) == FeatureType.FLOAT and \
                field not in (self.config["numerical_features"] or []):
            interaction.interaction[field] = torch.from_numpy(np.asarray(data[field].values, dtype=np.float64))
        return interaction

    return _dataframe_to_interaction


def wrap_get_load_and_unload_col(original):
    """``Dataset._get_load_and_unload_col``: a sequential model's time field is loaded even where ``load_col``
    leaves it out."""

    @functools.wraps(original)
    def _get_load_and_unload_col(self, source):
        load_col, unload_col = original(self, source)
        if load_col and _orders_by_time(self, source):
            load_col = set(load_col) | {self.time_field}
        return load_col, unload_col

    return _get_load_and_unload_col


def wrap_create_dataset(original):
    """``create_dataset`` records (or, for a checkpoint's Config, checks) the data's world, and unpickles no
    saved dataset the user did not name.

    RecBole 1.2.1 loads ``<checkpoint_dir>/<dataset>-<Class>.pth`` with plain ``pickle.load`` whenever such
    a file exists: a file dropped there runs code. Only ``dataset_save_path``, a file a user set and wrote
    themselves, is loaded.
    """
    from recbole_llm.checkpoint import lineage as world

    @functools.wraps(original)
    def create_dataset(config):
        final = config.final_config_dict
        named = final.get("dataset_save_path")
        if not named:  # RecBole would load its default file if one exists: point it at none
            final["dataset_save_path"] = os.path.join(final["checkpoint_dir"], ".recbole_llm-no-saved-dataset")
        try:
            dataset = original(config)
        except KeyError as error:  # RecBole's dataset.py:1160 looks each alias field up after loading the files
            alias = next((key for key in ALIAS_KEYS if error.args and error.args[0] in (final.get(key) or [])), None)
            if alias is None:
                raise
            raise DataError(f"{alias} names '{shown(error.args[0], 80)}', which no loaded file has: name fields "
                            "of the dataset's files (load_col decides which are loaded)") from None
        finally:
            final["dataset_save_path"] = named
        _check_pre_split_histories(config, dataset)
        trained = world.stored(config)
        if trained is not None:  # a checkpoint's Config: the data must be the one it was trained on
            world.check(trained, dataset)
        else:
            world.record(config, dataset)
        return dataset

    return create_dataset


def _check_pre_split_histories(config, dataset) -> None:
    """Pre-split files (``benchmark_filename``) give each row's history as a space-separated ``token_seq``
    field: typed ``token``, a whole history became one made-up item, and training failed in a traceback (or,
    with histories of one item, trained on them)."""
    from recbole.utils import FeatureType, ModelType

    if not config["benchmark_filename"] or config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        return
    field = config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]
    kind = dataset.field2type.get(field)
    if kind != FeatureType.TOKEN_SEQ:
        found = f"is typed {kind.value}" if kind is not None else "is missing"
        raise DataError(f"the pre-split files' history column {field} {found}: give each row's history as a "
                        f"column '{field}:token_seq' of space-separated item tokens")


# Plugin config keys that decide the training rows (recbole_llm.training.dataset): saved dataloaders built with other
# values hold other rows, which RecBole's own comparison (its dataset_arguments, seed, eval_args) misses.
TRAINING_ROW_KEYS = ("train_positions", "train_window_stride")


def wrap_load_split_dataloaders(original):
    """``load_split_dataloaders`` unpickles only the file ``dataloaders_save_path`` names, never RecBole's
    default ``<checkpoint_dir>/<dataset>-for-<model>-dataloader.pth`` (a file dropped there would run code),
    and rebuilds the loaders (returns None, as RecBole does for its own keys) when they were saved with other
    :data:`TRAINING_ROW_KEYS` values: a model scoring the last N positions of rows cut every M != N targets
    would train on a fraction of the targets, or some twice, with no error."""

    @functools.wraps(original)
    def load_split_dataloaders(config):
        if not config["dataloaders_save_path"]:
            return None
        loaders = original(config)
        # the dataset's Config: RecBole has already given the loaders the current one (update_config)
        built_with = loaders[0]._dataset.config if loaders is not None else None
        if loaders is not None and any(config[key] != built_with[key] for key in TRAINING_ROW_KEYS):
            return None
        return loaders

    return load_split_dataloaders


def wrap_save_split_dataloaders(original):
    """``save_split_dataloaders`` leaves the run's shuffling as it was.

    RecBole sets each loader's generator to None to pickle it and never puts it back: the run that saves
    then shuffles from the global RNG and its numbers differ from the same run without saving.
    """

    @functools.wraps(original)
    def save_split_dataloaders(config, dataloaders):
        generators = [(loader, loader.generator, getattr(loader.sampler, "generator", None))
                      for loader in dataloaders]
        try:
            return original(config, dataloaders)
        finally:
            for loader, generator, sampler_generator in generators:
                loader.generator, loader.sampler.generator = generator, sampler_generator

    return save_split_dataloaders
