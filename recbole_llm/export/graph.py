"""The scoring graph and its trace: a model's ``export_scores`` hook, then top-K with exclusions.

Every exportable model (:class:`recbole_llm.model.contract.Exportable`) provides ``export_scores``: the
plugin's models define it, RecBole's sequential models get it from :mod:`recbole_llm.patches`. So this
module names no model class. Inputs and outputs follow :mod:`recbole_llm.artifact.spec`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from recbole_llm.errors import RecboleLLMError
from recbole_llm.artifact import spec


class StaticShapeError(RecboleLLMError):
    """The exporter fixed a dimension the contract says is dynamic."""


class ScoringGraph(nn.Module):
    """What goes into the ONNX graph: the model's scores, then (with ``top_k``) the best K items that are
    neither padding nor in ``exclude_items``."""

    def __init__(self, model: nn.Module, top_k: int | None):
        super().__init__()
        self.model = model
        self.top_k = top_k

    def scores(self, item_seq: torch.Tensor, item_length: torch.Tensor) -> torch.Tensor:
        """float [batch, n_items] (column 0 is padding)."""
        return self.model.export_scores(item_seq, item_length)

    def forward(self, item_seq, item_length, exclude_items=None):
        scores = self.scores(item_seq, item_length)
        if self.top_k is None:
            return scores
        # the same exclusions and ordering as artifact.ranking.top_k, for graphs that return every score
        drop = torch.zeros_like(scores, dtype=torch.bool).scatter(
            1, exclude_items, torch.ones_like(exclude_items, dtype=torch.bool))
        drop[:, 0] = True  # padding is never recommended
        masked = scores.masked_fill(drop, float("-inf"))
        top_scores, top_items = torch.topk(masked, self.top_k, dim=-1)
        return top_items, top_scores


class UserVectorGraph(nn.Module):
    """What goes into the ONNX graph of an artifact with an item index: each history's vector, with the item
    table an input (``PluginModel.user_vectors``), so items added later take part as history items too."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, item_seq, item_length, item_vectors):
        return self.model.user_vectors(item_seq, item_length, item_vectors)


def trace(graph: ScoringGraph | UserVectorGraph, path: Path, max_length: int, opset: int,
          item_vectors: torch.Tensor | None = None) -> None:
    """Write ``graph`` to ``path`` with the TorchScript exporter (ONNX Runtime's transformer optimizer fuses
    its BERT graphs), every named axis of the contract dynamic; raises StaticShapeError otherwise.
    ``item_vectors`` ``[n_items, hidden]``: the example table of a :class:`UserVectorGraph`."""
    # an example with batch 2 and, where the model takes it, length >= 2, so the exporter keeps both axes
    # dynamic; a model of MAX_ITEM_LIST_LENGTH 1 has one position (its position table has one row), so its
    # example is one item long and the second history as long as the first
    item_seq = torch.ones((2, max_length), dtype=torch.long)
    shorter = min(2, max_length)
    item_length = torch.tensor([max_length, shorter], dtype=torch.long)
    item_seq[1, shorter:] = 0
    inputs: tuple = (item_seq, item_length)
    vectors = isinstance(graph, UserVectorGraph)
    top_k = None if vectors else graph.top_k
    if vectors:
        inputs += (item_vectors,)
    elif top_k is not None:
        inputs += (torch.tensor([[3, 5, 0], [0, 0, 0]], dtype=torch.long),)
    _export(graph, inputs, path, spec.input_specs(top_k, vectors), spec.output_specs(top_k, 0, vectors),
            opset)


def trace_text_tower(tower: nn.Module, path: Path, max_tokens: int, opset: int) -> None:
    """Write a text tower (``BERTRec.text_tower``) to ``path``: item text, tokenized, to item vectors."""
    input_ids = torch.full((2, max_tokens), 100, dtype=torch.long)
    attention_mask = torch.ones((2, max_tokens), dtype=torch.long)
    attention_mask[1, 3:] = 0
    input_ids[1, 3:] = 0
    _export(tower, (input_ids, attention_mask), path, *spec.text_tower_specs(), opset)


def _export(module: nn.Module, inputs: tuple, path: Path, input_specs, output_specs, opset: int) -> None:
    dynamic_axes = {spec.name: {axis: dim for axis, dim in enumerate(spec.shape) if isinstance(dim, str)}
                    for spec in [*input_specs, *output_specs]}
    with warnings.catch_warnings():
        # The tracer's notes on Python-side shape checks (constant for these graphs) and the exporter's
        # deprecation notice are not the user's business.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            inputs,
            str(path),
            input_names=[spec.name for spec in input_specs],
            output_names=[spec.name for spec in output_specs],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
    check_dynamic_inputs(path)


def check_dynamic_inputs(path: Path) -> None:
    """Every input axis of the saved graph is symbolic, as the contract says."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        fixed = [d.dim_value for d in dims if not d.dim_param]
        if fixed:
            raise StaticShapeError(
                f"the exporter fixed input '{graph_input.name}' to shape {[d.dim_value or d.dim_param for d in dims]}; "
                "dynamic batch and length are required (report this model as unsupported)"
            )
