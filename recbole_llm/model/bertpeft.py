r"""
BERTPEFT
################################################

Reference:
    Sourab Mangrulkar et al. "PEFT: State-of-the-art Parameter-Efficient Fine-Tuning methods." 2022,
    https://github.com/huggingface/peft (the library every method here comes from).

BERTRec with a frozen encoder and any peft method that applies to a BERT encoder, chosen by configuration:
``peft_type`` (LORA, ADALORA, IA3, LOHA, LOKR, VERA, ...) plus that method's own peft arguments as
top-level config keys under peft's names (``r``, ``lora_alpha``, ``target_modules``, ...). Item
embeddings, the optional LSTM pre-encoder and the adapter weights train; the backbone stays bit-identical.

Checkpoints hold only what trained plus a reference to the backbone (name or path and a SHA-256 of its
frozen weights): loading onto a different backbone is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from recbole_llm.errors import RecboleLLMError
from recbole_llm.model.bertrec import BERTRec
from recbole_llm.model.frozen import FrozenBackboneMixin


class EncoderWithLossSlot(nn.Module):
    """The encoder, returning an output with a zero ``loss`` peft tuners may add regularisers to.

    AdaLoRA adds its orthogonal regulariser inside its forward only when the output has ``.loss``; a
    feature extractor has none, so this gives it one and the model adds it to RecBole's loss.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config

    def forward(self, **kwargs):
        output = self.encoder(**kwargs)
        output["loss"] = torch.zeros((), device=output.last_hidden_state.device)
        return output


def peft_config_from(config: Any, peft_type: str, defaults: dict | None = None):
    """A peft config of ``peft_type`` from the RecBole config keys that carry its fields' names."""
    from peft import PeftType, PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    key = str(peft_type).upper()
    encoder_methods = sorted(
        name for name, config_class in PEFT_TYPE_TO_CONFIG_MAPPING.items()
        if not issubclass(config_class, PromptLearningConfig)
    )
    if key not in PeftType.__members__ or PeftType[key] not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise RecboleLLMError(
            f"unknown peft_type '{peft_type}'; use one of {', '.join(m.value for m in encoder_methods)}"
        )
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType[key]]
    if issubclass(config_class, PromptLearningConfig):
        raise RecboleLLMError(
            f"peft_type '{peft_type}' is a prompt-learning method, which needs token ids; "
            f"use an adapter method: {', '.join(m.value for m in encoder_methods)}"
        )
    arguments = dict(defaults or {})
    for field in dataclasses.fields(config_class):
        if field.init and field.name not in ("peft_type", "task_type") and field.name in config:
            value = config[field.name]
            if value is not None:
                arguments[field.name] = list(value) if isinstance(value, tuple) else value
    if "r" in arguments and int(arguments["r"]) <= 0:
        raise RecboleLLMError(f"r={arguments['r']} must be a positive rank; set r to 1 or more (e.g. 8)")
    try:
        return config_class(**arguments)
    except (TypeError, ValueError) as error:
        raise RecboleLLMError(f"invalid {key} settings: {error}".splitlines()[0]) from None


class BERTPEFT(FrozenBackboneMixin, BERTRec):
    r"""BERTRec with a frozen encoder adapted by any peft method named by ``peft_type``."""

    peft_type: str | None = None  # subclasses fix their method; BERTPEFT reads it from the config

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        peft_type = self.peft_type or config["peft_type"]
        if not peft_type:
            raise RecboleLLMError("peft_type is not set; set peft_type (e.g. LORA, IA3, LOHA)")

        self.remember_backbone()  # before any adapter touches it

        # define layers: peft freezes the backbone and injects the adapters
        self.encoder = self._adapt(self.encoder, self.build_peft_config(config, peft_type))

    def build_peft_config(self, config, peft_type: str):
        return peft_config_from(config, peft_type)

    def _adapt(self, encoder: nn.Module, peft_config) -> nn.Module:
        from peft import get_peft_model

        try:
            return get_peft_model(EncoderWithLossSlot(encoder), peft_config)
        except ValueError as error:
            message = str(error).splitlines()[0]
            if "not found in the base model" in message or "Target module" in message:
                names = sorted({name.rsplit(".", 1)[-1] for name, _ in encoder.named_modules() if name})
                raise RecboleLLMError(
                    f"target_modules {peft_config.target_modules} match nothing in the encoder; "
                    f"use module names such as {', '.join(n for n in names if n in ('query', 'key', 'value', 'dense'))}"
                ) from None
            raise RecboleLLMError(f"peft could not adapt the encoder: {message}") from None

    # --- forward: the tuner's own forward, so regularisers such as AdaLoRA's are applied ---------------

    def run_encoder(self, **inputs):
        # PeftModel.forward skips the tuner's forward; base_model is the tuner. Before adapters are
        # injected (text caching in BERTRec.__init__), a transformers model's base_model is itself.
        return self.encoder.base_model(**inputs)

    # --- inference and export -----------------------------------------------------------------------------

    def merge_adapters(self) -> bool:
        """Fold LoRA-family adapters into the backbone weights (peft's ``merge_and_unload``).

        Returns False, leaving the model as it is, for methods that cannot merge.
        """
        merge = getattr(self.encoder, "merge_and_unload", None)
        if merge is None:
            return False
        try:
            merged = merge()
        except (AttributeError, NotImplementedError, ValueError):
            return False
        self.encoder = _PlainEncoder(merged.encoder if isinstance(merged, EncoderWithLossSlot) else merged)
        return True

    def save_adapter(self, directory: str) -> None:
        """Write the adapter in peft's own ``save_pretrained`` format (adapter_config.json + weights)."""
        self.encoder.save_pretrained(directory)


class _PlainEncoder(nn.Module):
    """A merged encoder under the attribute path ``base_model`` that BERTPEFT.forward calls."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.base_model = encoder
        self.config = encoder.config

    def forward(self, **kwargs):
        return self.base_model(**kwargs)
