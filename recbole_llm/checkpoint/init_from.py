"""Start a run from another checkpoint's weights on newer data: item rows mapped by raw token (``init_from``).

RecBole numbers items by the order it meets them, so when interactions and items are added the same item
gets another internal id; a checkpoint's item rows are carried by the raw tokens its lineage recorded
(:mod:`recbole_llm.checkpoint.lineage`), never by position. Items new to the data start as a fresh model
starts them (item text for models with text, a fresh ID row), items gone from the data are dropped, and
everything that is not per item (encoder, adapters, projections, the LSTM) carries over as it is. Sequential
models here have no user rows: a user is their history, so new users need nothing.

``resume_from`` continues one run on the same data (optimizer, epoch, random state); ``init_from`` starts a
new run (fresh optimizer and schedule) from another run's weights. When both are set, ``resume_from`` wins:
a run begun with ``init_from`` is resumed by adding ``--resume_from=<its -latest.pth>`` to the same command.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from recbole_llm.checkpoint import lineage
from recbole_llm.checkpoint.checks import explain_unfitting_weights
from recbole_llm.errors import CheckpointError, ConfigError, DataError, RecboleLLMError, first_line, shown
from recbole_llm.model.catalog import PLUGIN_MODELS

# What must be as in the checkpoint for its weights to mean the same here (shapes are checked on loading).
# The text model that embedded item texts is compared by its weights (_check_text_model), not here by name.
SAME_KEYS = ("pretrained_model_name_or_path", "backbone_layers", "item_repr", "item_text_fields",
             "text_projection", "text_token_bag", "pre_encoder", "id_max_norm",
             # the adapters' meaning where their shapes do not show it (peft's names)
             "peft_type", "target_modules", "lora_alpha", "adapter_act")


def _meaning(key: str, value: Any) -> Any:
    """A key's value as the model reads it: checkpoints from before a key hold None for its default; a bundled
    model's hub id and its installed folder are the same model."""
    if key == "pretrained_model_name_or_path" and isinstance(value, str):
        from recbole_llm.model.backbone import canonical_model

        return canonical_model(value)
    if key == "text_token_bag":
        return bool(value)
    if key == "text_projection":
        return value or "trained"
    if key in ("pre_encoder", "item_repr") and isinstance(value, str):
        return value.lower()
    return "none" if key == "pre_encoder" and value is None else value


def check_init_from(final: dict, model: str | None, load: Callable[[str], dict]) -> dict | None:
    """The checkpoint ``init_from`` names, loaded safely and checked against this run's config before any data
    is read: one-line errors for a missing or refused file, a model RecBole owns, another model class, or
    another encoder or item representation. None when ``init_from`` is unset. ``load``: the allow-listed
    loader for a checkpoint whose model names are only compared
    (:func:`recbole_llm.checkpoint.loading.load_for_comparison`), passed in by the caller.

    Raises ConfigError or CheckpointError (the allow-listed loader's refusals).
    """
    path = final.get("init_from")
    if path is None or final.get("resume_from"):  # resume_from continues a run begun from init_from: it wins
        return None
    model = model or final.get("model")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"init_from={path!r} is not a path: pass --init_from=saved/<model>-<date>.pth")
    if model not in PLUGIN_MODELS:
        raise ConfigError(f"init_from starts a plugin model from a checkpoint; {model} is RecBole's: train it "
                          "from scratch (remove init_from)")
    if not os.path.isfile(path):
        raise CheckpointError(f"init_from '{path}' is not a file: pass a .pth checkpoint a plugin model saved")
    checkpoint = load(path)  # the allow-listed loader: refusals are one line
    trained = checkpoint["config"]
    name = trained["model"]
    if name not in PLUGIN_MODELS:
        raise CheckpointError(f"init_from '{path}' is a {name} checkpoint, a model the plugin does not own: start "
                              f"{model} from scratch, or from a checkpoint of {model}")
    if name != model:
        raise CheckpointError(f"init_from '{path}' holds a {name}, this run builds a {model}: run --model={name}, "
                              "or start from scratch")
    for key in SAME_KEYS:
        then, now = trained[key], final.get(key)
        if _meaning(key, then) != _meaning(key, now):
            raise CheckpointError(
                f"init_from '{path}' was trained with {key}={then!r}, this run has {key}={now!r}: its weights "
                f"would mean something else here; set --{key} as it was trained, or start from scratch")
    _check_text_model(path, checkpoint, final)
    if lineage.stored(trained) is None:
        raise CheckpointError(f"init_from '{path}' records no item tokens (saved before recbole_llm kept them): "
                              "its rows cannot be matched to items; start from scratch")
    return checkpoint


def _check_text_model(path: str, checkpoint: dict, final: dict) -> None:
    """The text model that embedded the checkpoint's item texts is this run's: the same weights (their SHA-256,
    saved with the frozen text path; a model moved to another folder is the same model), or, for checkpoints
    saved before the digest, the same model by name. Raises CheckpointError."""
    from recbole_llm.model.backbone import TEXT_MODEL_HASH, canonical_model, text_model_digest

    item_repr = final.get("item_repr")
    if not (isinstance(item_repr, str) and "text" in item_repr.lower()):
        return
    trained = checkpoint["config"]
    then = trained["text_model_name_or_path"] or trained["pretrained_model_name_or_path"]  # null: the coupled layout
    now = final.get("text_model_name_or_path") or final.get("pretrained_model_name_or_path")
    saved = checkpoint["state_dict"].get(TEXT_MODEL_HASH)
    if saved is None:
        same = isinstance(then, str) and isinstance(now, str) and canonical_model(then) == canonical_model(now)
    else:
        same = isinstance(now, str) and bytes(saved.to(torch.uint8).tolist()) == text_model_digest(now)
    if not same:
        raise CheckpointError(
            f"init_from '{path}' embedded item text with another text model ({then!r}) than this run's {now!r}: "
            "its item vectors would mean something else here; set --text_model_name_or_path to the model it was "
            "trained with, or start from scratch")


def initialise(model: Any, config: Any, dataset: Any, load: Callable[[str], dict]) -> str:
    """Load ``config['init_from']``'s weights into ``model`` (built for ``dataset``), rows by raw item token, and
    record the lineage on ``config`` (saved with every checkpoint of this run, written by export into the
    artifact's metadata). Returns the one-line summary: weights carried, items carried, new and dropped.

    Raises DataError when the checkpoint shares no item with ``dataset``, CheckpointError (one line) when its
    weights do not fit the model built here.
    """
    path = config["init_from"]
    checkpoint = check_init_from(config.final_config_dict, config["model"], load)
    trained_config = checkpoint["config"]
    field = config["ITEM_ID_FIELD"]
    before = lineage.stored(trained_config)["token_maps"].get(field) or []
    now = [str(token) for token in dataset.field2id_token[field]]
    row_of = {token: row for row, token in enumerate(before) if row}
    source = torch.tensor([row_of.get(token, -1) for token in now])
    source[0] = -1  # padding: the model's own (zero) row
    carried = int((source > 0).sum())
    if carried == 0:
        raise DataError(f"init_from '{path}' shares no item with '{config['dataset']}' at {config['data_path']} "
                        f"({len(before) - 1} items there, {len(now) - 1} here): it was trained on other data; "
                        "start from scratch")
    weights = checkpoint["state_dict"]
    own = model.state_dict()
    for name, tensor in weights.items():  # widths and adapters: one line before any row is copied
        here = own.get(name)
        if not isinstance(tensor, torch.Tensor) or here is None:
            continue
        rows = name in model.ITEM_ROWS  # per item: their number may differ, nothing else
        if (tensor.shape[1:] if rows else tensor.shape) != (here.shape[1:] if rows else here.shape):
            raise CheckpointError(
                f"init_from '{path}' does not fit the model built here: {name} is {list(tensor.shape)} there, "
                f"{list(here.shape)} here; set the widths and adapters it was trained with, or start from scratch")
    state = model.carry_over(weights, source)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # other layers or modules: torch's many lines, the first detail kept
        if explain_unfitting_weights(error, path) is None:
            raise
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        raise CheckpointError(
            f"init_from '{path}' does not fit the model built here ({shown(details[0] if details else '', 200)}); "
            "set the model's settings as it was trained (the data may differ), or start from scratch") from None
    except RecboleLLMError as error:  # a frozen-backbone model's own check (backbone hash, missing adapters)
        raise CheckpointError(f"init_from '{path}': {first_line(error)}") from None
    lineage.record_parent(config, {
        "checkpoint": os.path.basename(path), "sha256": lineage.file_digest(path),
        "dataset": trained_config["dataset"], "files": lineage.stored(trained_config)["files"], "items": len(before) - 1,
        "from": lineage.parent(trained_config),
    })
    new, dropped = len(now) - 1 - carried, len(before) - 1 - carried
    start = "from their text" if "text" in (model.item_repr or "") else "as a fresh model starts them"
    weights = [name for name in state if not name.startswith(("item_embedding", "item_trained", "token_bag"))]
    parts = sorted({name.split(".")[0] for name in weights if "." in name})  # the modules: encoder, projections ...
    return (f"init_from {os.path.basename(path)}: {len(weights)} weight tensors carried over ({', '.join(parts)}); "
            f"items: {carried} carried by token, {new} new ({start}), {dropped} dropped")
