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
import re
from typing import Any

import torch
from torch import nn

from recbole_llm.errors import ConfigError, RecboleLLMError
from recbole_llm.model.bertrec import BERTRec
from recbole_llm.model.frozen import FrozenBackboneMixin
from recbole_llm.settings import choice, integer, number


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


# peft fields that name encoder modules; peft reads a str in them as a regex full match on the whole module path
MODULE_NAME_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save")
# "query", "query,value", "[query, value]", "['query', 'value']", "attention.self.query": names, not patterns
_PLAIN_NAMES = re.compile(r"\[?\s*(['\"]?[\w.]+['\"]?\s*,\s*)*['\"]?[\w.]+['\"]?\s*,?\s*\]?")


def module_names(value: Any) -> Any:
    """Module names given as a string (``--target_modules=query``, ``target_modules: query,value``) as a list.

    peft matches a list by module name (``query`` adapts every ``....query``) but a str as a regex against the
    whole module path, so a bare name would match nothing. Strings that are only names, commas and brackets
    become lists; any other string (a regex, peft's ``all-linear``) and non-strings pass through unchanged.
    """
    if not isinstance(value, str) or not _PLAIN_NAMES.fullmatch(value.strip()):
        return value
    names = (name.strip().strip("'\"") for name in value.strip().strip("[]").split(","))
    return [name for name in names if name]


def _check_lora_family(arguments: dict) -> None:
    """The LoRA family's values that peft takes as given and fails on mid-training, in a traceback inside its
    layers (a string dropout, AdaLoRA's ``deltaT: 0`` or a ``target_r`` above ``init_r`` at its first
    budget step): each one checked here, one line naming key and a valid value."""
    if "r" in arguments:  # methods with a rank; peft's own default otherwise
        integer("r", arguments["r"], example=8)
    if "lora_alpha" in arguments:
        number("lora_alpha", arguments["lora_alpha"], low=0, low_open=True, example=16)
    if "lora_dropout" in arguments:
        number("lora_dropout", arguments["lora_dropout"], low=0, high=1, high_open=True, example=0.1)
    modules = arguments.get("target_modules")
    if modules is not None and not (isinstance(modules, str) or isinstance(modules, list) and modules
                                    and all(isinstance(name, str) for name in modules)):
        raise ConfigError(f"target_modules={modules!r:.60} must be module names: e.g. target_modules: [query, value]")
    if "init_r" in arguments or "target_r" in arguments:  # AdaLoRA
        init_r = integer("init_r", arguments.get("init_r", 12), example=12)
        target_r = integer("target_r", arguments.get("target_r", 8), example=4)
        if target_r > init_r:
            raise ConfigError(f"target_r={target_r} is above init_r={init_r}: AdaLoRA shrinks the rank from init_r "
                              "to target_r, so set target_r <= init_r (e.g. init_r: 12, target_r: 4)")
        integer("deltaT", arguments.get("deltaT", 1), example=10)


def peft_config_from(config: Any, peft_type: str, defaults: dict | None = None):
    """A peft config of ``peft_type`` from the RecBole config keys that carry its fields' names."""
    from peft import PeftType, PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    methods = {name: PEFT_TYPE_TO_CONFIG_MAPPING[member] for name, member in PeftType.__members__.items()
               if member in PEFT_TYPE_TO_CONFIG_MAPPING}
    encoder_methods = sorted(name.lower() for name, config_class in methods.items()
                             if not issubclass(config_class, PromptLearningConfig))
    if isinstance(peft_type, str) and issubclass(methods.get(peft_type.upper(), type(None)), PromptLearningConfig):
        raise ConfigError(
            f"peft_type={peft_type!r} is a prompt-learning method, which needs token ids; "
            f"use an adapter method: {', '.join(name.upper() for name in encoder_methods)}"
        )
    key = choice("peft_type", peft_type, encoder_methods).upper()
    config_class = methods[key]
    arguments = dict(defaults or {})
    for field in dataclasses.fields(config_class):
        if field.init and field.name not in ("peft_type", "task_type") and field.name in config:
            value = config[field.name]
            if value is not None:
                value = module_names(value) if field.name in MODULE_NAME_FIELDS else value
                arguments[field.name] = list(value) if isinstance(value, tuple) else value
    _check_lora_family(arguments)
    try:
        return config_class(**arguments)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid {key} settings: {error}".splitlines()[0]) from None


class BERTPEFT(FrozenBackboneMixin, BERTRec):
    r"""BERTRec with a frozen encoder adapted by any peft method named by ``peft_type``."""

    peft_type: str | None = None  # subclasses fix their method; BERTPEFT reads it from the config

    def __init__(self, config, dataset):
        super().__init__(config, dataset)  # reads and checks the keys (read_config), builds the encoder

        self.remember_backbone()  # before any adapter touches it

        # define layers: peft freezes the backbone and injects the adapters
        self.encoder = self._adapt(self.encoder, self.peft_settings)
        del self.peft_settings  # the adapted encoder holds it (encoder.peft_config)

    def read_config(self, config, dataset) -> None:
        """BERTRec's keys, then ``peft_type`` and the method's peft arguments, as a checked peft config."""
        super().read_config(config, dataset)
        peft_type = self.peft_type or config["peft_type"]
        if not peft_type:
            raise ConfigError(f"peft_type={peft_type!r} is not set; set peft_type (e.g. LORA, IA3, LOHA)")
        self.peft_settings = self.build_peft_config(config, dataset, peft_type)

    def build_peft_config(self, config, dataset, peft_type: str):
        """The peft config of ``peft_type`` from ``config``; subclasses derive arguments from ``dataset``."""
        return peft_config_from(config, peft_type)

    def _adapt(self, encoder: nn.Module, peft_config) -> nn.Module:
        from peft import get_peft_model

        try:
            return get_peft_model(EncoderWithLossSlot(encoder), peft_config)
        except ValueError as error:
            message = str(error).splitlines()[0]
            targets = _shown(peft_config.target_modules)
            names, linear = encoder_module_names(encoder)
            if "not found in the base model" in message:
                raise ConfigError(
                    f"target_modules {targets} match no module of the encoder; its modules are "
                    f"{', '.join(names)}; set target_modules to some of them (its linear layers: {', '.join(linear)})"
                ) from None
            if "Target module" in message and "is not supported" in message:
                method = getattr(peft_config.peft_type, "value", peft_config.peft_type)
                raise ConfigError(
                    f"{method} cannot adapt target_modules {targets}: {message} Set target_modules to layers it "
                    f"supports, e.g. the encoder's linear layers {', '.join(linear)}"
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


def encoder_module_names(encoder: nn.Module) -> tuple[list[str], list[str]]:
    """The names target_modules can use: leaf names of the encoder's modules that hold weights, and of its
    ``nn.Linear`` layers (for BERT: query, key, value, dense)."""
    names, linear = set(), set()
    for path, module in encoder.named_modules():
        name = path.rsplit(".", 1)[-1]
        if path and not name.isdigit() and any(True for _ in module.parameters(recurse=False)):
            names.add(name)
            if isinstance(module, nn.Linear):
                linear.add(name)
    return sorted(names, key=str.lower), sorted(linear, key=str.lower)


def _shown(target_modules: Any) -> str:
    """target_modules as the user wrote them: a regex quoted, names as a sorted list."""
    if isinstance(target_modules, str):
        return repr(target_modules)
    return repr(sorted(target_modules or []))


class _PlainEncoder(nn.Module):
    """A merged encoder under the attribute path ``base_model`` that BERTPEFT.forward calls."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.base_model = encoder
        self.config = encoder.config

    def forward(self, **kwargs):
        return self.base_model(**kwargs)
