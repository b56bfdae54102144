"""The scoring graph and its trace: a model's ``export_scores`` hook, then top-K with exclusions.

Every exportable model (:class:`recbole_llm.model.contract.Exportable`) provides ``export_scores``: the
plugin's models define it, RecBole's sequential models get it from :mod:`recbole_llm.patches`. So this
module names no model class. Inputs and outputs follow :mod:`recbole_llm.export.artifact`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from recbole_llm.errors import RecboleLLMError
from recbole_llm.export import artifact


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
        # the same exclusions and ordering as artifact.top_k, for graphs that return every score
        drop = torch.zeros_like(scores, dtype=torch.bool).scatter(
            1, exclude_items, torch.ones_like(exclude_items, dtype=torch.bool))
        drop[:, 0] = True  # padding is never recommended
        masked = scores.masked_fill(drop, float("-inf"))
        top_scores, top_items = torch.topk(masked, self.top_k, dim=-1)
        return top_items, top_scores


def trace(graph: ScoringGraph, path: Path, max_length: int, opset: int) -> None:
    """Write ``graph`` to ``path`` with the TorchScript exporter (ONNX Runtime's transformer optimizer fuses
    its BERT graphs), every named axis of the contract dynamic; raises StaticShapeError otherwise."""
    # an example with batch and length >= 2, so the exporter keeps both axes dynamic
    item_seq = torch.ones((2, max_length), dtype=torch.long)
    item_length = torch.tensor([max_length, 2], dtype=torch.long)
    item_seq[1, 2:] = 0
    inputs: tuple = (item_seq, item_length)
    if graph.top_k is not None:
        inputs += (torch.tensor([[3, 5, 0], [0, 0, 0]], dtype=torch.long),)
    specs = artifact.input_specs(graph.top_k) + artifact.output_specs(graph.top_k, 0)
    dynamic_axes = {spec.name: {axis: dim for axis, dim in enumerate(spec.shape) if isinstance(dim, str)}
                    for spec in specs}
    with warnings.catch_warnings():
        # The tracer's notes on Python-side shape checks (constant for these graphs) and the exporter's
        # deprecation notice are not the user's business.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            inputs,
            str(path),
            input_names=artifact.input_names(graph.top_k),
            output_names=artifact.output_names(graph.top_k),
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
