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
"""

from __future__ import annotations

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss
from torch import nn

from recbole_llm.errors import RecboleLLMError
from recbole_llm.model.backbone import build_encoder


class BERTRec(SequentialRecommender):
    r"""A BERT-family encoder over item sequences, fully fine-tuned, with weight-tied item scoring."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        self.pretrained_model_name_or_path = config["pretrained_model_name_or_path"]
        self.loss_type = config["loss_type"]
        self.initializer_range = config["initializer_range"]
        self.pre_encoder_type = (config["pre_encoder"] or "none").lower()

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

    def encode_items(self, item_seq: torch.Tensor) -> torch.Tensor:
        """The vectors fed to the encoder for a batch of item-id sequences, ``[batch, length, hidden]``."""
        item_emb = self.item_embedding(item_seq)
        if self.pre_encoder is not None:
            # RecBole pads at the end, so a left-to-right LSTM never sees padding before a real item.
            item_emb, _ = self.pre_encoder(item_emb)
        return item_emb

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        attention_mask = (item_seq != 0).long()
        hidden = self.encoder(
            inputs_embeds=self.encode_items(item_seq), attention_mask=attention_mask
        ).last_hidden_state
        return self.gather_indexes(hidden, item_seq_len - 1)  # [B, H]

    def calculate_loss(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        seq_output = self.forward(item_seq, item_seq_len)
        pos_items = interaction[self.POS_ITEM_ID]
        if self.loss_type == "BPR":
            neg_items = interaction[self.NEG_ITEM_ID]
            pos_score = (seq_output * self.item_embedding(pos_items)).sum(dim=-1)
            neg_score = (seq_output * self.item_embedding(neg_items)).sum(dim=-1)
            return self.loss_fct(pos_score, neg_score)
        logits = seq_output @ self.item_embedding.weight.t()
        return self.loss_fct(logits, pos_items)

    def predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        test_item_emb = self.item_embedding(interaction[self.ITEM_ID])
        return (seq_output * test_item_emb).sum(dim=1)  # [B]

    def full_sort_predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return seq_output @ self.item_embedding.weight.t()  # [B, n_items]
