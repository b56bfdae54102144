r"""
BERTLoRA
################################################

Reference:
    Edward J. Hu et al. "LoRA: Low-Rank Adaptation of Large Language Models." In ICLR 2022.

BERTRec with a frozen encoder and peft's LoRA on its attention projections: ``r``, ``lora_alpha``,
``lora_dropout`` and ``target_modules`` come from ``properties/BERTLoRA.yaml`` under peft's names. The
adapters merge into the backbone for inference (``merge_adapters``).
"""

from __future__ import annotations

from recbole_llm.model.bertpeft import BERTPEFT


class BERTLoRA(BERTPEFT):
    r"""A frozen BERT encoder with LoRA adapters; item embeddings and adapters train."""

    peft_type = "LORA"
