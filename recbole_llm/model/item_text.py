"""Item text: RecBole item features as text, tokenized once with the backbone's tokenizer.

``item_text_fields`` names item-feature fields (``token_seq``, ``token`` or ``float``/``float_seq`` fields
of the ``.item`` file, e.g. ``movie_title`` and ``class`` on ml-100k); each item's text joins their values.
The result is a pair of tensors ``[n_items, item_text_max_tokens]`` (input ids, attention mask) built when
the model is built, so nothing is tokenized per batch.
"""

from __future__ import annotations

import logging

import torch
from recbole.utils import FeatureSource, FeatureType

from recbole_llm.errors import RecboleLLMError

TEXT_TYPES = (FeatureType.TOKEN, FeatureType.TOKEN_SEQ)


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
