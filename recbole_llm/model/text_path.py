"""BERTRec's item text path: item text embedded by a pretrained sentence encoder, projected to item vectors.

``text_encoder: frozen`` embeds every item's text once with the whole sentence encoder
``text_model_name_or_path`` (null: the sequence encoder's own pretrained model) and caches it; the linear
``text_projection`` maps that width to the sequence encoder's, so a small random sequence encoder (SASRec's 64
wide) can take a 384-wide sentence encoder's knowledge (Hou et al., "Towards Universal Sequence Representation
Learning for Recommender Systems", KDD 2022: frozen PLM text embeddings, adapted into the sequence model's
space). ``trained`` runs the texts through the sequence encoder itself (adapters included) at every step.

The state names (``text_projection``, ``text_centre``, ``item_trained``, ``token_bag``) are the model's own, as
checkpoints have always held them: this module is a mixin of :class:`recbole_llm.model.bertrec.BERTRec`.
"""

from __future__ import annotations

import torch
from torch import nn

from recbole_llm.errors import CheckpointError
from recbole_llm.model.backbone import (TEXT_MODEL_HASH, load_text_encoder, pretrained_config, resolve_pretrained,
                                        weights_digest)
from recbole_llm.model.item_text import TokenBag, item_texts, mean_pool, text_vectors, tokenize_items

def projection_start(vectors: torch.Tensor, hidden: int, scale: float) -> torch.Tensor:
    """The text projection's starting weight ``[hidden, text_width]`` for unit text vectors ``[n, text_width]``.

    As wide or wider than the text (``hidden >= text_width``): the identity, padded with zero rows, times
    ``scale`` (each item's text vector at the norm ID embeddings start with). Narrower: the catalogue's
    ``hidden`` principal directions (PCA, the linear map that keeps most of the texts' variance), each signed so
    its largest coefficient is positive (the same on every LAPACK), scaled so that the projected vectors' RMS
    norm is ``scale``. Directions beyond the catalogue's rank are zero rows.
    """
    text_width = vectors.size(-1)
    if hidden >= text_width or len(vectors) < 2:
        return scale * torch.eye(hidden, text_width)
    _, _, directions = torch.linalg.svd(vectors - vectors.mean(dim=0), full_matrices=False)
    directions = directions[:hidden]
    signs = directions.gather(1, directions.abs().argmax(dim=1, keepdim=True)).sign()
    weight = torch.zeros(hidden, text_width)
    weight[: len(directions)] = directions * signs
    rms = (vectors @ weight.t()).pow(2).sum(dim=-1).mean().sqrt().clamp_min(1e-12)
    return weight * (scale / rms)


class ItemTextPath:
    """The text half of :class:`BERTRec` (``item_repr`` text or id+text). Reads the model's ``item_text_fields``,
    ``item_text_max_tokens``, ``text_model_name_or_path``, ``text_encoder_mode``, ``text_projection_mode``,
    ``text_token_bag``, ``id_max_norm``, ``hidden_size`` and ``initializer_range``."""

    def _build_item_text(self, dataset) -> None:
        """Tokenize every item's text once; with a frozen text encoder, encode it once too."""
        from transformers import AutoTokenizer

        texts = item_texts(dataset, self.item_text_fields)
        tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(self.text_model_name_or_path))
        input_ids, attention_mask, self.items_without_text = tokenize_items(
            texts, tokenizer, self.item_text_max_tokens
        )
        has_text = torch.tensor([bool(text.strip()) for text in texts])
        # items with interactions in the training split: only they have a trained ID correction
        trained = torch.zeros(len(texts), dtype=torch.bool)
        for field in (dataset.iid_field, self.ITEM_SEQ):
            if field in dataset.inter_feat:
                trained[dataset.inter_feat[field].flatten()] = True
        trained[0] = False
        # derived from the dataset and the backbone at construction: not part of checkpoints
        self.register_buffer("text_input_ids", input_ids, persistent=False)
        self.register_buffer("text_attention_mask", attention_mask, persistent=False)
        self.register_buffer("item_has_text", has_text, persistent=False)
        # Capped: which items had a trained ID is part of the model (saved with it), not re-read from whatever
        # data a later evaluate or export finds: an item that gained interactions since keeps being its text.
        self.register_buffer("item_trained", trained, persistent=self.id_max_norm is not None)
        # the sentence encoder's width (frozen) or the sequence encoder's (trained: the texts run through it)
        self.text_width = pretrained_config(self.text_model_name_or_path).hidden_size \
            if self.text_encoder_mode == "frozen" else self.hidden_size
        self.text_projection = nn.Linear(self.text_width, self.hidden_size)
        # starts as the (normalised) text embedding at the norm ID embeddings start with
        scale = self.initializer_range * self.hidden_size**0.5
        with torch.no_grad():
            self.text_projection.weight.copy_(scale * torch.eye(self.hidden_size, self.text_width))
            self.text_projection.bias.zero_()
        self.token_bag = TokenBag(input_ids, tokenizer.all_special_ids, len(tokenizer), self.hidden_size) \
            if self.text_token_bag else None
        if self.text_projection_mode == "frozen":
            # Let It Go's frozen content embedding: a trained projection over ~10^3 items' 384-wide text vectors
            # can fit each training item apart (an ID table in disguise) and then maps new texts poorly
            self.text_projection.requires_grad_(False)
        if self.text_encoder_mode == "frozen":
            # The whole pretrained sentence encoder, every layer, whatever backbone_layers cut from the
            # sequence encoder: item text is embedded once, so its depth costs nothing per step.
            text_tower = load_text_encoder(self.text_model_name_or_path)
            with torch.no_grad():
                pooled = self._pool_texts(text_tower, batch_size=256)
            # Which weights embedded the texts, saved with the model: a checkpoint is refused on another text model
            # of the same shape (a moved folder that holds other weights would otherwise score every item wrongly).
            self.register_buffer(TEXT_MODEL_HASH, torch.tensor(list(weights_digest(text_tower)), dtype=torch.uint8))
            del text_tower
            self.register_buffer("text_pooled", pooled, persistent=False)
            # The catalogue's mean that centres text vectors is part of the model (saved with it): a model
            # started from this one on a grown catalogue (init_from) keeps its items' vectors exactly.
            self.register_buffer("text_centre", pooled[1:].mean(dim=0))
            if self.text_width > self.hidden_size:  # narrower sequence encoder: start from the texts' PCA
                with torch.no_grad():
                    self.text_projection.weight.copy_(
                        projection_start(self.text_embeddings[1:][has_text[1:]], self.hidden_size, scale))

    @property
    def text_embeddings(self) -> torch.Tensor:
        """``text_encoder: frozen``: every item's text vector, centred by ``text_centre`` and normalised,
        ``[n_items, text_width]``."""
        return text_vectors(self.text_pooled, self.text_centre)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + TEXT_MODEL_HASH)
        if TEXT_MODEL_HASH in self._buffers and saved is not None and not torch.equal(
                saved.to(torch.uint8), self._buffers[TEXT_MODEL_HASH]):
            raise CheckpointError(
                f"the checkpoint's item texts were embedded by another text model than "
                f"'{self.text_model_name_or_path}' (its weights differ): set text_model_name_or_path (or, without "
                "it, pretrained_model_name_or_path) to the model it was trained with")
        # Checkpoints written before these buffers were saved: the values their data gives. A capped model's
        # item_trained mask; the frozen text path's centre (the catalogue's mean, as these were trained with); no
        # text model digest (nothing to check).
        for name in ("item_trained", "text_centre", TEXT_MODEL_HASH):
            key = prefix + name
            if name in self._buffers and name not in self._non_persistent_buffers_set and key not in state_dict:
                state_dict[key] = self._buffers[name]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _pool_texts(self, encoder: nn.Module, batch_size: int | None = None) -> torch.Tensor:
        """Mean-pooled states of every item's text through ``encoder``, ``[n_items, encoder width]``."""
        batch_size = batch_size or len(self.text_input_ids)
        parts = []
        for start in range(0, len(self.text_input_ids), batch_size):
            ids = self.text_input_ids[start : start + batch_size]
            mask = self.text_attention_mask[start : start + batch_size]
            hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            parts.append(mean_pool(hidden, mask))
        return torch.cat(parts)

    def _encode_texts(self) -> torch.Tensor:
        """``text_encoder: trained``: every item's text through the sequence encoder (adapters included),
        centred and normalised, ``[n_items, hidden]``, with gradients."""
        pooled = self._pool_texts(self.run_encoder)
        return text_vectors(pooled, pooled[1:].mean(dim=0))

    def text_tower(self) -> nn.Module | None:
        """A module mapping item text (``input_ids``, ``attention_mask`` int64 ``[items, item_text_max_tokens]``,
        from the text model's tokenizer) to item vectors ``[items, hidden]``: the row an item that was never
        trained gets from its text alone (its ID embedding, untrained, counts as zero). None without item text.

        ``text_encoder: frozen``: the whole sentence encoder, centred by the catalogue's mean as at training;
        ``trained``: the sequence encoder (adapters included), centred by the current catalogue's mean.
        """
        if "text" not in self.item_repr:
            return None
        if self.text_encoder_mode == "frozen":
            encoder, centre = load_text_encoder(self.text_model_name_or_path), self.text_centre
        else:
            with torch.no_grad():
                centre = self._pool_texts(self.run_encoder, batch_size=256)[1:].mean(dim=0)
            encoder = _RunEncoder(self)
        return ItemTextTower(encoder, centre.detach().clone(), self.text_projection, self.token_bag).eval()


class _RunEncoder(nn.Module):
    """``model.run_encoder`` as a module (adapters included), for a text tower of ``text_encoder: trained``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return self.model.run_encoder(**inputs)


class ItemTextTower(nn.Module):
    """Item text to item vectors: mean-pooled encoder states ``[items, text_width]``, centred, normalised,
    projected to ``[items, hidden]`` (:meth:`ItemTextPath.text_tower`)."""

    def __init__(self, encoder: nn.Module, centre: torch.Tensor, projection: nn.Linear,
                 token_bag: TokenBag | None = None):
        super().__init__()
        self.encoder, self.projection, self.token_bag = encoder, projection, token_bag
        self.register_buffer("centre", centre)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        vectors = self.projection(text_vectors(mean_pool(hidden, attention_mask), self.centre))
        if self.token_bag is not None:
            vectors = vectors + self.token_bag(input_ids)
        return vectors
