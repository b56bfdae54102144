r"""
BERTRec
################################################

Reference:
    Jacob Devlin et al. "BERT: Pre-training of Deep Bidirectional Transformers for Language
    Understanding." In NAACL 2019 (the encoder and its pretrained weights).

    Wang-Cheng Kang and Julian McAuley. "Self-Attentive Sequential Recommendation." In ICDM 2018
    (next-item prediction from the last position, scored against shared item embeddings).

A pretrained (or randomly initialised) Hugging Face BERT-family encoder over item-ID sequences. Item
embeddings of the encoder's width go in through ``inputs_embeds`` with a padding mask; the hidden state at
each sequence's last real item scores every item through the same (tied) item embedding table. With
``pre_encoder: lstm`` an LSTM first runs over the item embeddings (S = LSTM(X), then the encoder), the
hybrid sequence model of the design document.

Item representations (``item_repr``): ``id`` (an embedding per item id), ``text`` (the pretrained encoder's
mean-pooled embedding of the item's text from ``item_text_fields``, projected; items that never appear in
the interactions get real scores, zero-shot) or ``id+text`` (their sum). ``text_encoder: frozen`` encodes
the texts once with the pretrained encoder and caches them (fast); ``trained`` runs them through the same
encoder, adapters included, at every step (slower, adapts to the catalogue). Items without text fall back
to their ID embedding.
"""

from __future__ import annotations

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss
from torch import nn

from recbole_llm.errors import RecboleLLMError
from recbole_llm.model.backbone import build_encoder, most_recent, resolve_pretrained
from recbole_llm.model.item_text import item_texts, mean_pool, tokenize_items

ITEM_REPRS = ("id", "text", "id+text")
TEXT_ENCODERS = ("frozen", "trained")


class BERTRec(SequentialRecommender):
    r"""A BERT-family encoder over item sequences, fully fine-tuned, with weight-tied item scoring."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        self.pretrained_model_name_or_path = config["pretrained_model_name_or_path"]
        self.loss_type = config["loss_type"]
        self.initializer_range = config["initializer_range"]
        self.pre_encoder_type = (config["pre_encoder"] or "none").lower()
        self.item_repr = (config["item_repr"] or "id").lower()
        self.text_encoder_mode = (config["text_encoder"] or "frozen").lower()

        # define layers and loss
        self.encoder = build_encoder(config)
        self.hidden_size = self.encoder.config.hidden_size
        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        if self.pre_encoder_type == "lstm":
            self.pre_encoder = nn.LSTM(self.hidden_size, self.hidden_size, batch_first=True)
        elif self.pre_encoder_type == "none":
            self.pre_encoder = None
        else:
            raise RecboleLLMError(
                f"pre_encoder '{config['pre_encoder']}' is not supported; use 'lstm' or null"
            )
        if self.loss_type == "BPR":
            self.loss_fct = BPRLoss()
        elif self.loss_type == "CE":
            self.loss_fct = nn.CrossEntropyLoss()
        else:
            raise RecboleLLMError(f"loss_type '{self.loss_type}' is not supported; use 'CE' or 'BPR'")

        # The encoder's own word table is never read (item ids go in as inputs_embeds): freeze it so
        # parameter counts and the optimizer see only what trains.
        word_embeddings = getattr(getattr(self.encoder, "embeddings", None), "word_embeddings", None)
        if word_embeddings is not None:
            word_embeddings.weight.requires_grad_(False)

        # parameters initialization: only the new modules; the encoder keeps its (pretrained) weights
        nn.init.normal_(self.item_embedding.weight, std=self.initializer_range)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

        self._baked_item_table = None
        if self.item_repr not in ITEM_REPRS:
            raise RecboleLLMError(f"item_repr '{config['item_repr']}' is not supported; use one of {', '.join(ITEM_REPRS)}")
        if self.text_encoder_mode not in TEXT_ENCODERS:
            raise RecboleLLMError(
                f"text_encoder '{config['text_encoder']}' is not supported; use one of {', '.join(TEXT_ENCODERS)}"
            )
        if "text" in self.item_repr:
            self._build_item_text(config, dataset)

    def _build_item_text(self, config, dataset) -> None:
        """Tokenize every item's text once; with a frozen text encoder, encode it once too."""
        from transformers import AutoTokenizer

        fields = config["item_text_fields"]
        if not fields:
            raise RecboleLLMError(
                f"item_repr '{self.item_repr}' needs item_text_fields, e.g. [movie_title, class] on ml-100k"
            )
        if self.pretrained_model_name_or_path is None:
            raise RecboleLLMError(
                f"item_repr '{self.item_repr}' needs a pretrained encoder and its tokenizer; "
                "set pretrained_model_name_or_path"
            )
        fields = [fields] if isinstance(fields, str) else list(fields)
        texts = item_texts(dataset, fields)
        tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(self.pretrained_model_name_or_path))
        input_ids, attention_mask, self.items_without_text = tokenize_items(
            texts, tokenizer, int(config["item_text_max_tokens"] or 32)
        )
        has_text = torch.tensor([bool(text.strip()) for text in texts])
        # derived from the dataset and the backbone at construction: not part of checkpoints
        self.register_buffer("text_input_ids", input_ids, persistent=False)
        self.register_buffer("text_attention_mask", attention_mask, persistent=False)
        self.register_buffer("item_has_text", has_text, persistent=False)
        self.text_projection = nn.Linear(self.hidden_size, self.hidden_size)
        with torch.no_grad():
            # starts as the (normalised) text embedding at the norm ID embeddings start with
            scale = self.initializer_range * self.hidden_size**0.5
            self.text_projection.weight.copy_(scale * torch.eye(self.hidden_size))
            self.text_projection.bias.zero_()
        if self.text_encoder_mode == "frozen":
            self.register_buffer("text_embeddings", self._encode_texts(batch_size=256), persistent=False)

    def _encode_texts(self, batch_size: int | None = None) -> torch.Tensor:
        """Mean-pooled encoder states of every item's text, ``[n_items, hidden]``."""
        batch_size = batch_size or len(self.text_input_ids)
        was_training = self.training
        if self.text_encoder_mode == "frozen":
            self.eval()  # the cache holds dropout-free embeddings
        parts = []
        with torch.set_grad_enabled(self.text_encoder_mode == "trained" and torch.is_grad_enabled()):
            for start in range(0, len(self.text_input_ids), batch_size):
                ids = self.text_input_ids[start : start + batch_size]
                mask = self.text_attention_mask[start : start + batch_size]
                hidden = self.run_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                parts.append(mean_pool(hidden, mask))
        self.train(was_training)
        embeddings = torch.cat(parts)
        # Mean-pooled encoder states of short titles share a large common component (cosine ~0.7 between
        # unrelated films, norm ~6): centre over the real items and normalise, as sentence encoders do,
        # so what differs between items is what the model sees.
        centred = embeddings - embeddings[1:].mean(dim=0, keepdim=True)
        return nn.functional.normalize(centred, dim=-1)

    def item_table(self) -> torch.Tensor:
        """Every item's representation, ``[n_items, hidden]`` (row 0 is padding)."""
        if self._baked_item_table is not None:
            return self._baked_item_table
        if self.item_repr == "id":
            return self.item_embedding.weight
        text = self.text_embeddings if self.text_encoder_mode == "frozen" else self._encode_texts()
        text = self.text_projection(text)
        ids = self.item_embedding.weight
        table = text if self.item_repr == "text" else ids + text
        table = torch.where(self.item_has_text.unsqueeze(-1), table, ids)  # items without text: their ID
        return table

    def bake_item_table(self) -> None:
        """Fix the item representations for inference and export (text encoded once, not per call)."""
        with torch.no_grad():
            self._baked_item_table = self.item_table().detach().clone()

    def encode_items(self, item_seq: torch.Tensor, item_table: torch.Tensor | None = None) -> torch.Tensor:
        """The vectors fed to the encoder for a batch of item-id sequences, ``[batch, length, hidden]``."""
        if item_table is None and self.item_repr == "id" and self._baked_item_table is None:
            item_emb = self.item_embedding(item_seq)
        else:
            item_emb = nn.functional.embedding(item_seq, self.item_table() if item_table is None else item_table)
        if self.pre_encoder is not None:
            # RecBole pads at the end, so a left-to-right LSTM never sees padding before a real item.
            item_emb, _ = self.pre_encoder(item_emb)
        return item_emb

    def run_encoder(self, **inputs):
        """The encoder's forward (subclasses route it through their adapters)."""
        return self.encoder(**inputs)

    def encoder_output(self, item_seq: torch.Tensor, item_table: torch.Tensor | None = None):
        attention_mask = (item_seq != 0).long()
        return self.run_encoder(inputs_embeds=self.encode_items(item_seq, item_table), attention_mask=attention_mask)

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, item_table: torch.Tensor | None = None):
        item_seq, item_seq_len = most_recent(item_seq, item_seq_len, self.max_seq_length)
        hidden = self.encoder_output(item_seq, item_table).last_hidden_state
        return self.gather_indexes(hidden, item_seq_len - 1)  # [B, H]

    def calculate_loss(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        table = self.item_table()  # once per step: with a trained text encoder it encodes every item
        seq_output = self.forward(item_seq, item_seq_len, table)
        pos_items = interaction[self.POS_ITEM_ID]
        if self.loss_type == "BPR":
            neg_items = interaction[self.NEG_ITEM_ID]
            pos_score = (seq_output * table[pos_items]).sum(dim=-1)
            neg_score = (seq_output * table[neg_items]).sum(dim=-1)
            return self.loss_fct(pos_score, neg_score)
        logits = seq_output @ table.t()
        return self.loss_fct(logits, pos_items)

    def predict(self, interaction):
        table = self.item_table()
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], table)
        return (seq_output * table[interaction[self.ITEM_ID]]).sum(dim=1)  # [B]

    def full_sort_predict(self, interaction):
        table = self.item_table()
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], table)
        return seq_output @ table.t()  # [B, n_items]
