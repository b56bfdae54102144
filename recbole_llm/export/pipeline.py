"""The whole export: checkpoint in, artifact folder out (see :mod:`recbole_llm.export` for the steps).

1. Load the checkpoint once, safely (a pickle that would run code is refused), and rebuild model and data
   with RecBole's ``load_data_and_model``; refuse models without a history to score before building data.
2. Merge LoRA-family adapters into the backbone where they can merge; bake item representations (text
   ones included) into a constant table.
3. Trace (:mod:`~recbole_llm.export.graph`), then validate against the unmerged PyTorch model
   (:mod:`~recbole_llm.export.validate`); optionally optimize, quantize or convert
   (:mod:`~recbole_llm.export.optimize`), validating after each.
4. Write ``model.onnx``, ``metadata.json`` (the same keys in the graph's metadata_props, with metadata.json's
   digest and every companion file's size and digest: the artifact vouches for each of its files) and, with
   ``triton``, a Triton repository (:mod:`~recbole_llm.export.triton`) into a temporary folder renamed into
   place only when everything passed: a failed export leaves nothing behind.
"""

from __future__ import annotations

import copy
import datetime
import errno
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recbole_llm.errors import RecboleLLMError
from recbole_llm.artifact.files import companion_files, file_record, read_regular, sha256_of, signed_graph
from recbole_llm.artifact.folder import atomic_folder
from recbole_llm.artifact.metadata import check_metadata, served_exclude_seen
from recbole_llm.artifact.spec import FORMAT_VERSION, ITEM_VECTORS_FILE, METADATA_FILE, MODEL_FILE, PADDING_TOKEN, TEXT_TOWER_FILE, TOKENIZER_FILE, input_names, output_names
from recbole_llm.export import graph, optimize, triton, validate
from recbole_llm.export.options import ExportOptions, check_before_loading
from recbole_llm.export.validate import ValidationReport
from recbole_llm.checkpoint import lineage
from recbole_llm.model.contract import PluginModel


# ---------------------------------------------------------------------------------------------------------
# loading


def load_for_export(checkpoint: str | os.PathLike, overrides: dict | None = None):
    """(config, model in eval mode, dataset, test_data) from a checkpoint, read once and without running code
    from it; ``overrides`` are set on its Config first (:func:`recbole_llm.checkpoint.overrides.config_overrides`). A
    model without a history to score is refused before any data is built."""
    config, model, dataset, _, test_data = _load(checkpoint, overrides)
    return config, model, dataset, test_data


def _load(checkpoint, overrides):
    """(config, model in eval mode, dataset, train_data, test_data): load_for_export's, and the training
    data whose repeat rate an export records."""
    from recbole_llm.checkpoint.loading import load_for_use

    config, model, dataset, train_data, _, test_data = load_for_use(checkpoint, overrides, check=_check_exportable)
    model.eval()
    return config, model, dataset, train_data, test_data


def repeat_rate(model, train_data) -> float | None:
    """The share of the training data's next items that are already in the history the model reads (its
    window of MAX_ITEM_LIST_LENGTH items): what RecBole's evaluator counts as a hit and the served
    ``exclude_seen`` drops. None when there is no training row (nothing to count)."""
    import numpy as np

    interactions = getattr(getattr(train_data, "dataset", None), "inter_feat", None)
    if interactions is None:  # not RecBole's dataloader: nothing to count
        return None
    fields = set(interactions.columns)
    if not {model.ITEM_SEQ, model.ITEM_SEQ_LEN, model.POS_ITEM_ID} <= fields:
        return None
    item_seq = interactions[model.ITEM_SEQ].numpy()
    lengths = interactions[model.ITEM_SEQ_LEN].numpy()
    targets = interactions[model.POS_ITEM_ID].numpy()
    if not len(targets):
        return None
    repeats = 0
    for start in range(0, len(targets), 65536):  # bounded memory however long the log
        seq = item_seq[start : start + 65536]
        inside = np.arange(seq.shape[1])[None, :] < lengths[start : start + 65536, None]
        repeats += int(((seq == targets[start : start + 65536, None]) & inside).any(axis=1).sum())
    return round(repeats / len(targets), 6)


def export_model(model: nn.Module, onnx_attention: bool = True) -> tuple[nn.Module, bool]:
    """A copy of ``model`` ready to trace, and whether adapters merged: a plugin model's LoRA-family adapters
    merged where they can merge and its item representations (text ones included) baked in as a constant
    table (:class:`recbole_llm.model.contract.PluginModel`), attention written out for ONNX Runtime's fusion
    unless ``onnx_attention`` is False (PyTorch's own fastest form, for measuring PyTorch); RecBole's models as
    they are."""
    exported = copy.deepcopy(model).eval()
    merged = False
    if isinstance(exported, PluginModel):
        merged = bool(exported.merge_adapters())
        exported.bake_item_table()
        if onnx_attention:
            # Traced, PyTorch's fused SDPA attention becomes MatMul/Softmax/Transpose/Where glue that ONNX
            # Runtime's BERT optimizer does not match; the eager implementation (the same product, written
            # out) fuses into its Attention operator. The copy only: training keeps SDPA.
            exported.encoder.config._attn_implementation = "eager"
    return exported, merged


# ---------------------------------------------------------------------------------------------------------
# metadata and Triton


def item_tokens(config, dataset) -> list[str]:
    """Internal item id -> raw item token, index 0 padding: the map the checkpoint was trained with
    (:mod:`recbole_llm.checkpoint.lineage`), else the dataset's for checkpoints that predate it."""
    from recbole_llm.checkpoint import lineage as world

    trained = world.stored(config)
    if trained is not None and dataset.iid_field in trained["token_maps"]:
        tokens = list(trained["token_maps"][dataset.iid_field])
    else:
        tokens = [str(token) for token in dataset.field2id_token[dataset.iid_field]]
    tokens[0] = PADDING_TOKEN
    return tokens


def _versions(opset: int) -> dict[str, Any]:
    import onnxruntime
    import recbole

    from recbole_llm.version import __version__

    return {
        "recbole_llm": __version__,
        "recbole": recbole.__version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": opset,
    }


# ---------------------------------------------------------------------------------------------------------
# the whole export


@dataclass
class ExportResult:
    """What an export wrote: the artifact folder, its metadata (as in metadata.json) and validation reports."""

    path: Path
    metadata: dict[str, Any]
    reports: list[ValidationReport]

    def summary(self) -> list[str]:
        """One line per validation, then where the artifact is: what ``recbole-llm export`` prints."""
        lines = []
        for report in self.reports:
            if report.graph == "text tower":
                lines.append(f"validated text tower: {report.rows} item texts, {report.lengths[0]}-"
                             f"{report.lengths[-1]} tokens, max |diff| {report.max_abs_diff:.2e}")
                continue
            fused = f", fused {report.fused_operators}" if report.fused_operators else ""
            if report.quantized_operators:
                fused += f", int8 {report.quantized_operators}"
            lines.append(
                f"validated {report.precision}: {report.rows} test histories, lengths {report.lengths[0]}-"
                f"{report.lengths[-1]}, max |diff| {report.max_abs_diff:.2e}, top-{report.top} overlap "
                f"{report.top10_overlap:.3f}{fused}")
        lines.append(f"wrote {self.path}")
        return lines


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike,
                      options: ExportOptions | None = None) -> ExportResult:
    """Export a RecBole checkpoint to an artifact folder ``output``.

    Raises RecboleLLMError with a one-line reason (the validation kinds: ``ValidationFailed``); nothing is
    left at ``output`` then, and an existing artifact there is replaced only with ``force``."""
    options = options or ExportOptions()
    check_before_loading(checkpoint, output, options)
    output = Path(output).resolve()

    # RecBole logs the whole config and dataset summary when it loads a checkpoint: an export's log is its
    # validation figures (--state=info brings RecBole's back)
    config, model, dataset, train_data, test_data = _load(checkpoint, {"state": "warning", **options.config_overrides})
    repeats = repeat_rate(model, train_data)
    del train_data
    n_items = int(model.n_items)
    if options.top_k is not None and options.top_k >= n_items:
        raise RecboleLLMError(f"--top-k {options.top_k} exceeds the {n_items - 1} items of the model: use at most "
                              f"{n_items - 1}")
    if options.item_index and not isinstance(model, PluginModel):
        raise RecboleLLMError(
            f"--item-index needs a recbole_llm model (BERTRec, BERTLoRA, ...): {config['model']} scores items "
            "inside its own layers; export it without --item-index")
    exported, merged = export_model(model)
    max_length = int(config["MAX_ITEM_LIST_LENGTH"])
    item_seq, item_length = validate.validation_inputs(model, test_data, options.validation_rows)
    reference = validate.reference_scores(model, item_seq, item_length)  # the model before merging
    table = None
    if options.item_index:
        with torch.no_grad():
            table = exported.item_table().detach().float().cpu().numpy().copy()
        table[0] = 0.0  # padding: never scored, never read (masked) in a history

    def check(path: Path, precision: str) -> ValidationReport:
        return validate.validate(path, reference, item_seq, item_length, precision, options.top_k,
                                 options.max_abs_diff, options.min_overlap, item_vectors=table)

    try:
        with atomic_folder(output) as staging:  # renamed into place when whole, else removed
            onnx_path = staging / MODEL_FILE
            if table is None:
                graph.trace(graph.ScoringGraph(exported, options.top_k).eval(), onnx_path, max_length, options.opset)
            else:
                graph.trace(graph.UserVectorGraph(exported).eval(), onnx_path, max_length, options.opset,
                            torch.from_numpy(table))
            reports = [check(onnx_path, "fp32")]
            fused: dict[str, int] = {}
            if options.optimize:
                encoder_config = getattr(getattr(exported, "encoder", None), "config", None)
                fused = optimize.optimize(onnx_path, getattr(encoder_config, "num_attention_heads", 0) or 0,
                                          getattr(encoder_config, "hidden_size", 0) or 0)
                reports.append(check(onnx_path, "fp32"))
                reports[-1].fused_operators = fused
            if options.int8:
                quantized = optimize.quantize_int8(onnx_path, n_items)
                reports.append(check(onnx_path, "int8"))
                reports[-1].quantized_operators = quantized
            if options.fp16:
                optimize.convert_fp16(onnx_path)
                reports.append(check(onnx_path, "fp16"))

            metadata = {
                "format_version": FORMAT_VERSION,
                "model": config["model"],
                "dataset": config["dataset"],
                "checkpoint": os.path.basename(os.fspath(checkpoint)),
                "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "max_length": max_length,
                "n_items": n_items,
                "top_k": options.top_k,
                "precision": "int8" if options.int8 else "fp16" if options.fp16 else "fp32",
                "optimized": options.optimize,
                "fused_operators": fused,
                "adapters_merged": merged,
                "item_repr": config["item_repr"] or "id",
                "inputs": input_names(options.top_k, table is not None),
                "outputs": output_names(options.top_k, table is not None),
                "versions": _versions(options.opset),
                "validation": [asdict(r) for r in reports],
                # offline vs served: RecBole's evaluator counts a repeated item as a hit; served answers drop the
                # history's items unless the data says users come back to items (export/README.md)
                "repeat_rate": repeats,
                "exclude_seen": served_exclude_seen(repeats),
                "lineage": lineage.parent(config),  # the checkpoint its training started from (init_from)
                "item_tokens": item_tokens(config, dataset),
            }
            if table is not None:
                metadata.update(write_item_index(exported, table, staging, options, reports))
            check_metadata(metadata, staging / METADATA_FILE)  # what the runtime will read
            sign_graph(onnx_path, metadata)
            (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
            if options.triton:
                triton.write_repository(staging, config["model"], options.top_k, n_items,
                                        options.triton_max_batch_size)
    except OSError as error:
        reason = "no space left on the device" if error.errno == errno.ENOSPC else error.strerror or str(error)
        raise RecboleLLMError(
            f"could not write the artifact to '{output}': {reason}; free space or choose another --output "
            "(nothing was written)"
        ) from None
    return ExportResult(output, metadata, reports)


def write_item_index(model: nn.Module, table, staging: Path, options: ExportOptions,
                     reports: list[ValidationReport]) -> dict[str, Any]:
    """The item table (``item_vectors.npy``) and, for a model with item text, its text tower
    (``text_tower.onnx``, validated against PyTorch on the model's own item texts) and tokenizer: the
    metadata keys ``item_index`` and ``text_tower``."""
    import numpy as np

    np.save(staging / ITEM_VECTORS_FILE, table.astype(np.float32), allow_pickle=False)
    keys: dict[str, Any] = {"item_index": {"file": ITEM_VECTORS_FILE, "dim": int(table.shape[1]),
                                           "sha256": sha256_of(staging / ITEM_VECTORS_FILE)},
                            "text_tower": None}
    tower = model.text_tower()
    if tower is None:
        return keys
    from transformers import AutoTokenizer

    from recbole_llm.model.backbone import resolve_pretrained

    max_tokens = int(model.item_text_max_tokens)
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(model.text_model_name_or_path))
    if not tokenizer.is_fast:
        raise RecboleLLMError(f"--item-index with item text needs a fast (Rust) tokenizer with a tokenizer.json; "
                              f"'{model.text_model_name_or_path}' has none: export without --item-index")
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    # what the model's own tokenization did (item_text.tokenize_items), so the runtime needs no transformers
    backend.enable_truncation(max_length=max_tokens)
    backend.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    backend.save(str(staging / TOKENIZER_FILE))
    tower_path = staging / TEXT_TOWER_FILE
    graph.trace_text_tower(tower, tower_path, max_tokens, options.opset)
    reports.append(validate.validate_text_tower(tower, tower_path, model.text_input_ids, model.text_attention_mask,
                                                model.item_has_text, options.max_abs_diff))
    keys["text_tower"] = {"file": TEXT_TOWER_FILE, "tokenizer": TOKENIZER_FILE,
                          "max_tokens": max_tokens, "item_text_fields": list(model.item_text_fields),
                          "text_model": str(model.text_model_name_or_path)}
    return keys


def _check_exportable(config) -> None:
    """Only sequential models have a history to score: say so before building the data."""
    from recbole.utils import ModelType

    if config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        raise RecboleLLMError(
            f"{config['model']} is not a sequential model (it ranks without a history), so there is nothing to "
            "export; export a sequential model such as BERTLoRA, BERTRec, SASRec, GRU4Rec or BERT4Rec"
        )


def sign_graph(onnx_path: Path, metadata: dict) -> None:
    """Write metadata.json's keys, its digest and every companion file's size and digest into the graph's
    metadata_props (:func:`recbole_llm.artifact.files.signed_graph`): the runtime checks all of them at load."""
    folder = onnx_path.parent
    files = {name: file_record(read_regular(folder / name))
             for name in companion_files(metadata)}
    onnx_path.write_bytes(signed_graph(read_regular(onnx_path), metadata, files))
