r"""
BERTAdapter
################################################

Reference:
    Neil Houlsby et al. "Parameter-Efficient Transfer Learning for NLP." In ICML 2019.

BERTRec with a frozen encoder and Houlsby bottleneck adapters after the attention and the feed-forward
sub-layers of every layer: ``x + up(act(down(x)))`` with ``adapter_size`` hidden units, the up-projection
initialised to zero so training starts from the pretrained function. The layer norms train too, as in the
paper.

Why not a library: peft has no bottleneck adapter type, and AdapterHub's ``adapters`` package pins
``transformers~=4.57``, which would hold the whole stack back. The adapter is a dozen lines: a module
placed after each sub-layer's output projection, before its residual layer norm.
"""

from __future__ import annotations

import torch
from torch import nn

from recbole_llm.model.bertrec import BERTRec
from recbole_llm.model.frozen import FrozenBackboneMixin
from recbole_llm.settings import choice, integer


ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class BottleneckAdapter(nn.Module):
    """``x + up(act(down(x)))``: identity at initialisation."""

    def __init__(self, hidden_size: int, adapter_size: int, activation: str = "gelu"):
        super().__init__()
        self.down = nn.Linear(hidden_size, adapter_size)
        self.up = nn.Linear(adapter_size, hidden_size)
        self.activation = ACTIVATIONS[activation]()
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.activation(self.down(hidden)))


class BERTAdapter(FrozenBackboneMixin, BERTRec):
    r"""A frozen BERT encoder with Houlsby bottleneck adapters; item embeddings, adapters, layer norms train."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)  # reads and checks the keys (read_config), builds the encoder

        self.remember_backbone()

        # define layers: freeze the backbone, then add adapters after both sub-layers of every layer
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
        for layer in self.encoder.encoder.layer:
            for sublayer_output in (layer.attention.output, layer.output):
                sublayer_output.dense = nn.Sequential(
                    sublayer_output.dense,
                    BottleneckAdapter(self.hidden_size, self.adapter_size, self.adapter_act),
                )
                sublayer_output.LayerNorm.requires_grad_(True)

    def read_config(self, config, dataset) -> None:
        """BERTRec's keys, then ``adapter_size`` and ``adapter_act``."""
        super().read_config(config, dataset)
        self.adapter_size = integer("adapter_size", config["adapter_size"], example=64)
        self.adapter_act = choice("adapter_act", config["adapter_act"], tuple(ACTIVATIONS))

    def merge_adapters(self) -> bool:
        """Bottleneck adapters are non-linear: they cannot fold into the backbone and stay as modules."""
        return False
