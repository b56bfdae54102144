"""Item text: RecBole item features as text, tokenized once with the backbone's tokenizer.

``item_text_fields`` names item-feature fields (``token_seq``, ``token`` or ``float``/``float_seq`` fields
of the ``.item`` file, e.g. ``movie_title`` and ``class`` on ml-100k); each item's text joins their values.
The result is a pair of tensors ``[n_items, item_text_max_tokens]`` (input ids, attention mask) built when
the model is built, so nothing is tokenized per batch.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from recbole.utils import FeatureSource, FeatureType

from recbole_llm.errors import ConfigError, RecboleLLMError
from recbole_llm.model.backbone import DEFAULT_PRETRAINED, canonical_model, check_text_encoder
from recbole_llm.settings import choice, number

TEXT_TYPES = (FeatureType.TOKEN, FeatureType.TOKEN_SEQ)
TEXT_PROJECTIONS = ("trained", "frozen")  # text_projection: trained with the model, or Let It Go's frozen


def anchor_settings(config) -> tuple[float | None, float, bool]:
    """``(id_max_norm, id_dropout_prob, text_token_bag)`` of a config, checked: one-line ConfigError naming key and fix.

    The text-anchored item representation ("Let It Go? Not Quite", Fedorov et al., RecSys 2025: a frozen
    content embedding plus a trainable correction of capped norm; DropoutNet, Volkovs et al., NeurIPS 2017:
    IDs dropped in training so that content alone learns to score). ``id_max_norm`` (None: uncapped) bounds
    ``item_repr: id+text``'s ID part by that multiple of the item's text vector norm; ``id_dropout_prob`` in
    [0, 1) drops it for that share of items at each training step; ``text_token_bag`` adds a trained vector per
    text token (:class:`TokenBag`). Called when the Config is built (before
    any data is read) and by the model.
    """
    read = config.get if isinstance(config, dict) else config.__getitem__  # RecBole's Config: None when unset
    cap, dropout = read("id_max_norm"), read("id_dropout_prob")
    if cap is not None:  # null: uncapped IDs
        cap = number("id_max_norm", cap, low=0, low_open=True, example=0.5)
    dropout = 0.0 if dropout is None else number("id_dropout_prob", dropout, low=0, high=1, high_open=True,
                                                   example=0.3)
    if read("text_projection") is not None:  # null: checkpoints from before the key, which trained it
        choice("text_projection", read("text_projection"), TEXT_PROJECTIONS)
    bag = read("text_token_bag")
    if bag not in (None, True, False):
        raise ConfigError(f"text_token_bag={bag!r} must be true or false: e.g. --text_token_bag=False")
    bag = bool(bag)  # null: checkpoints from before the key, which had none
    item_repr = read("item_repr")
    if bag and not (isinstance(item_repr, str) and "text" in item_repr.lower()):
        raise ConfigError(f"text_token_bag=True learns vectors of item text tokens, but item_repr={item_repr!r} has "
                          "no text: set item_repr: id+text (or text) with item_text_fields, or text_token_bag: false")
    given = f"id_max_norm={cap!r}" if cap is not None else f"id_dropout_prob={dropout!r}" if dropout > 0 else None
    if given and not (isinstance(item_repr, str) and item_repr.lower() == "id+text"):
        raise ConfigError(
            f"{given} shapes the ID part of item_repr id+text, but item_repr={item_repr!r}: set item_repr: id+text "
            "(with item_text_fields), or leave id_max_norm and id_dropout_prob unset"
        )
    if given and not read("item_text_fields"):
        raise ConfigError(
            f"item_repr=id+text with {given} anchors items at their text, but item_text_fields is not set: set "
            "item_text_fields (e.g. [movie_title, class] on ml-100k), or item_repr: id"
        )
    return cap, dropout, bag


def text_model(config) -> str | None:
    """The sentence encoder that embeds item text: ``text_model_name_or_path``, or (null) the sequence encoder's
    ``pretrained_model_name_or_path``; None when neither is set. Checked when the Config is built (before any
    data is read) and by the model: one-line ConfigError naming the key and a valid value for a value that is not
    a name, the key set without item text, item text without item_text_fields, no pretrained model at all for item text (a random sequence encoder
    without a text model), ``text_encoder: trained`` (texts run through the sequence encoder) with another text
    model, and a text model that cannot embed text (:func:`check_text_encoder`). Its width may differ from the
    sequence encoder's: a linear map joins them.
    """
    read = config.get if isinstance(config, dict) else config.__getitem__  # RecBole's Config: None when unset
    name, sequence = read("text_model_name_or_path"), read("pretrained_model_name_or_path")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ConfigError(f"text_model_name_or_path={name!r} must be a hub id or a folder of a sentence encoder, or "
                          f"null for the sequence encoder's own: e.g. --text_model_name_or_path={DEFAULT_PRETRAINED}")
    model = sequence if name is None else name  # checkpoints from before the key: the coupled layout
    item_repr = read("item_repr")
    if not (isinstance(item_repr, str) and "text" in item_repr.lower()):
        if name is not None:
            raise ConfigError(f"text_model_name_or_path={name!r} embeds item text, but item_repr={item_repr!r} has "
                              "none: set item_repr: id+text (or text) with item_text_fields, or leave "
                              "text_model_name_or_path unset")
        return model  # no item text: nothing reads it
    fields = read("item_text_fields")
    if not fields:
        raise ConfigError(f"item_text_fields={fields!r} but item_repr={item_repr!r} needs item text: set "
                          "item_text_fields, e.g. [movie_title, class] on ml-100k")
    if model is None:
        raise ConfigError(
            f"item_repr={item_repr!r} embeds item text with a pretrained sentence encoder, but the sequence encoder "
            f"is random (pretrained_model_name_or_path: null): set --text_model_name_or_path={DEFAULT_PRETRAINED}")
    if str(read("text_encoder")).lower() == "trained" and (
            not isinstance(sequence, str) or canonical_model(model) != canonical_model(sequence)):
        raise ConfigError(
            f"text_encoder=trained runs item text through the sequence encoder, but text_model_name_or_path={name!r} "
            "names another model: set text_encoder: frozen, or text_model_name_or_path: null")
    check_text_encoder(model, read("item_text_max_tokens"),
                       "text_model_name_or_path" if name is not None else "pretrained_model_name_or_path")
    return model


def bounded(vectors: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """``vectors`` ``[n, d]`` with each row's norm clipped to ``limit`` ``[n, 1]`` (rows within it unchanged).

    A projection onto the ball, differentiable almost everywhere, applied in the forward pass so that the
    weights stay free and the used correction never leaves its bound (Let It Go's capped delta).
    """
    norms = vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return vectors * (limit / norms).clamp(max=1.0)


def item_texts(dataset, fields: list[str]) -> list[str]:
    """One string per internal item id (index 0, padding, is empty)."""
    if dataset.item_feat is None:
        raise RecboleLLMError(
            f"item_text_fields {fields} need an item file ({dataset.dataset_name}.item) loaded; add "
            f"load_col: {{item: [{dataset.iid_field}, {', '.join(fields)}]}}"
        )
    item_feat = dataset.item_feat
    for field_name in fields:
        if field_name not in dataset.field2type or dataset.field2source.get(field_name) != FeatureSource.ITEM:
            raise RecboleLLMError(
                f"item text field '{field_name}' is not a loaded item feature of '{dataset.dataset_name}'; "
                f"load it (load_col: {{item: [{dataset.iid_field}, {field_name}]}}) or fix item_text_fields"
            )
        if dataset.field2type[field_name] not in TEXT_TYPES:
            raise RecboleLLMError(
                f"item text field '{field_name}' is a {dataset.field2type[field_name].value} field, not text "
                "(token or token_seq); choose text fields for item_text_fields"
            )
    n_items = dataset.item_num
    texts = [[] for _ in range(n_items)]
    for field_name in fields:
        id_to_token = dataset.field2id_token[field_name]
        values = item_feat[field_name]
        for item_id in range(1, n_items):
            value = values[item_id]
            ids = value.tolist() if value.dim() else [int(value)]
            words = [str(id_to_token[i]) for i in ids if i != 0]
            if words:
                texts[item_id].append(" ".join(words))
    return [", ".join(parts) for parts in texts]


def tokenize_items(texts: list[str], tokenizer, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, number of items without text); padding row 0 included."""
    encoded = tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt"
    )
    empty = sum(1 for text in texts[1:] if not text.strip())
    if empty:
        logging.getLogger().warning(
            f"{empty} items have no text in item_text_fields: they fall back to their ID embedding"
        )
    return encoded["input_ids"], encoded["attention_mask"], empty


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states under the mask (how all-MiniLM-L6-v2 builds sentence embeddings)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)



class TokenBag(nn.Module):
    """A trained vector per text token, averaged over an item's tokens: the content part that learns.

    fastText-style bag of tokens (Joulin et al., "Bag of Tricks for Efficient Text Classification", EACL 2017)
    beside the frozen sentence vector: a token's vector is shared by every item whose text has it (a genre, a
    release year, a word of a series' title), so what the warm items teach it reaches items known only by
    their text. Rows exist for the tokens of the training catalogue's texts (``token_rows`` maps a tokenizer id
    to its row, 0 for special, padding and unseen tokens); row 0 and untrained rows are zero, so a token no
    training item had adds nothing. Input ``input_ids`` ``[items, tokens]`` (int64), output ``[items, hidden]``.
    """

    def __init__(self, input_ids: torch.Tensor, special_ids: list[int], vocab_size: int, hidden_size: int):
        super().__init__()
        seen = torch.unique(input_ids)
        seen = seen[~torch.isin(seen, torch.tensor(special_ids, dtype=seen.dtype))]
        rows = torch.zeros(max(vocab_size, int(input_ids.max()) + 1), dtype=torch.long)
        rows[seen] = torch.arange(1, len(seen) + 1)
        # the catalogue's vocabulary is part of the model: saved with it, not re-read from later data
        self.register_buffer("token_rows", rows)
        self.embedding = nn.Embedding(len(seen) + 1, hidden_size, padding_idx=0)
        nn.init.zeros_(self.embedding.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.token_rows[input_ids.clamp(0, self.token_rows.numel() - 1)]
        counts = (rows > 0).sum(dim=-1, keepdim=True).clamp(min=1).to(self.embedding.weight.dtype)
        return self.embedding(rows).sum(dim=1) / counts


def text_vectors(pooled: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Item text vectors from mean-pooled sentence-encoder states ``[n, hidden]``: centred and normalised.

    Mean-pooled states of short titles share a large common component (cosine ~0.7 between unrelated films,
    norm ~6): subtracting the catalogue's mean ``centre`` ``[hidden]`` and normalising, as sentence encoders
    do, leaves what differs between items. Rows stay unit vectors ``[n, hidden]``.
    """
    return nn.functional.normalize(pooled - centre, dim=-1)
