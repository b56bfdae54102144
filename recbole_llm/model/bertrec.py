r"""
BERTRec
################################################

Reference:
    Jacob Devlin et al. "BERT: Pre-training of Deep Bidirectional Transformers for Language
    Understanding." In NAACL 2019 (the encoder and its pretrained weights).

    Wang-Cheng Kang and Julian McAuley. "Self-Attentive Sequential Recommendation." In ICDM 2018
    (next-item prediction from the last position, scored against shared item embeddings).

    Zhiwei Wang et al. "R-Transformer: Recurrent Neural Network Enhanced Transformer." arXiv:1907.05572,
    2019 (``pre_encoder: lstm_residual``: recurrent states added to the inputs of attention).

A pretrained (or randomly initialised) Hugging Face BERT-family encoder over item-ID sequences. Item
embeddings of the encoder's width go in through ``inputs_embeds`` with a padding mask; the hidden state at
each sequence's last real item scores every item through the same (tied) item embedding table. With
``pre_encoder: lstm`` an LSTM first runs over the item embeddings (S = LSTM(X), then the encoder), the
hybrid sequence model of the design document; ``lstm_residual`` adds its states to the embeddings instead
(S = X + LSTM(X), as R-Transformer adds its RNN's states to its inputs), so each item's own embedding
reaches the encoder.

Item representations (``item_repr``): ``id`` (an embedding per item id), ``text`` (the pretrained encoder's
mean-pooled embedding of the item's text from ``item_text_fields``, projected; items that never appear in
the interactions get real scores, zero-shot) or ``id+text`` (their sum). ``text_encoder: frozen`` encodes
the texts once with the pretrained encoder and caches them (fast); ``trained`` runs them through the same
encoder, adapters included, at every step (slower, adapts to the catalogue). Items without text fall back
to their ID embedding. With ``text_model_name_or_path`` the frozen texts come from another sentence encoder
than the sequence encoder, of any width (a small random sequence encoder over a 384-wide sentence encoder's
text, projected: :mod:`recbole_llm.model.text_path`).

Text-anchored items (``id+text`` with ``id_max_norm``), after Fedorov et al., "Let It Go? Not Quite:
Addressing Item Cold Start in Sequential Recommendations with Content-Based Initialization", RecSys 2025:
an item is its projected text vector plus an ID correction whose norm is capped at ``id_max_norm`` times
that vector's norm, so trained items stay near their text and an item never trained (no interactions in
the training split, or added to an artifact later) is its text vector alone, in the same space.
``id_dropout_prob`` drops the correction of that share of items at each training step (Volkovs et al.,
"DropoutNet: Addressing Cold Start in Recommender Systems", NeurIPS 2017), so the model learns to score
from text alone too. ``text_projection: frozen`` keeps the projection of text vectors at its start, as Let It
Go keeps its content embeddings frozen. All three are opt-in (benchmarks/results/cold_explore.md).
"""

from __future__ import annotations

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss
from torch import nn

from recbole_llm.errors import ConfigError
from recbole_llm.model.backbone import build_encoder, most_recent
from recbole_llm.model.full_softmax import full_softmax_cross_entropy
from recbole_llm.model.item_text import TEXT_PROJECTIONS, TokenBag, anchor_settings, bounded, text_model
from recbole_llm.model.text_path import ItemTextPath
from recbole_llm.model.positions import TRAIN_POSITIONS, window_stride
from recbole_llm.settings import choice, integer, listed, names, number

# Rows per group in full-ranking evaluation (see BERTRec.full_sort_predict): RecBole's eval batches of 1,024 or
# more split into groups whose lengths are close, while each group stays a batch that keeps a CPU's or GPU's
# matrix units busy.
EVAL_GROUP_ROWS = 256

PRE_ENCODERS = ("lstm", "lstm_residual", "none")
LOSS_TYPES = ("CE", "BPR")
ITEM_REPRS = ("id", "text", "id+text")
TEXT_ENCODERS = ("frozen", "trained")


class BERTRec(ItemTextPath, SequentialRecommender):
    r"""A BERT-family encoder over item sequences, fully fine-tuned, with weight-tied item scoring.

    Implements :class:`recbole_llm.model.contract.PluginModel`, the contract the plugin's trainer, export and
    DDP code rely on: ``export_scores``, ``checkpoint_state_dict`` (the whole state dict),
    ``after_optimizer_step`` (nothing to do), ``merge_adapters`` (nothing to merge), ``bake_item_table``,
    ``item_embedding`` and ``backbone_hash`` (None: the backbone trains).

    Subclasses (see :class:`recbole_llm.model.bertpeft.BERTPEFT`) extend :meth:`read_config` for their own
    keys, calling ``super().read_config`` first, so that every setting is read and checked before the
    encoder is loaded; they route the encoder's forward through :meth:`run_encoder` and override the
    contract's hooks they need. Defaults live in ``properties/<Model>.yaml``, not here.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info: every key read and checked before any layer is built (loading a
        # pretrained encoder takes seconds; a typo should not wait for it)
        self.read_config(config, dataset)
        self.backbone_hash: str | None = None  # the backbone trains: no frozen weights to identify

        # define layers and loss
        self.encoder = build_encoder(config)
        self.hidden_size = self.encoder.config.hidden_size
        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        if self.pre_encoder_type in ("lstm", "lstm_residual"):
            self.pre_encoder = nn.LSTM(self.hidden_size, self.hidden_size, batch_first=True)
        else:
            self.pre_encoder = None
        # CE itself runs in full_softmax_cross_entropy; the attribute stays, as in RecBole's models
        self.loss_fct = BPRLoss() if self.loss_type == "BPR" else nn.CrossEntropyLoss()

        # The encoder's own word table is never read (item ids go in as inputs_embeds): freeze it so
        # parameter counts and the optimizer see only what trains.
        word_embeddings = getattr(getattr(self.encoder, "embeddings", None), "word_embeddings", None)
        if word_embeddings is not None:
            word_embeddings.weight.requires_grad_(False)

        # parameters initialization: only the new modules; the encoder keeps its (pretrained) weights
        nn.init.normal_(self.item_embedding.weight, std=self.initializer_range)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

        self._baked_item_table: torch.Tensor | None = None
        self.token_bag: TokenBag | None = None  # text_token_bag: built with the item text
        if "text" in self.item_repr:
            self._build_item_text(dataset)

    def read_config(self, config, dataset) -> None:
        """Read this model's keys from ``config`` into attributes, each checked (one-line ConfigError).

        The encoder's own keys (sizes, dropouts, ``backbone_layers``, the position table) are checked by
        :func:`recbole_llm.model.backbone.check_encoder_settings`, when the Config is built. Subclasses
        extend this for their keys, calling ``super().read_config(config, dataset)`` first.
        """
        self.pretrained_model_name_or_path: str | None = config["pretrained_model_name_or_path"]
        loss_type = config["loss_type"]
        if loss_type not in LOSS_TYPES:  # RecBole's Config refuses other names; null reaches here
            raise ConfigError(f"loss_type={loss_type!r} is not supported; use {listed(LOSS_TYPES)}")
        self.loss_type: str = loss_type
        self.initializer_range = number("initializer_range", config["initializer_range"], low=0, low_open=True, example=0.02)
        pre_encoder = config["pre_encoder"]
        # null is documented (BERTRec.yaml) as no pre-encoder
        self.pre_encoder_type = "none" if pre_encoder is None else choice("pre_encoder", pre_encoder, PRE_ENCODERS)
        self.item_repr = choice("item_repr", config["item_repr"], ITEM_REPRS)
        self.text_encoder_mode = choice("text_encoder", config["text_encoder"], TEXT_ENCODERS)
        # null (checkpoints from before the key) is the projection that trained
        projection = config["text_projection"]
        self.text_projection_mode = "trained" if projection is None else choice(
            "text_projection", projection, TEXT_PROJECTIONS)
        self.train_positions = choice("train_positions", config["train_positions"], TRAIN_POSITIONS)
        if self.train_positions == "all" and loss_type == "BPR":
            raise ConfigError(
                "train_positions='all' predicts every position against every item (CE); loss_type='BPR' samples "
                "one negative per row: use loss_type: CE, or train_positions: last"
            )
        # positions scored per training row (train_positions: all): the dataset keeps a row every `stride` targets
        self.train_window_stride: int | None = window_stride(config)
        self.item_text_max_tokens = integer("item_text_max_tokens", config["item_text_max_tokens"], example=32)
        fields = config["item_text_fields"]
        self.item_text_fields: list[str] = names("item_text_fields", fields, "[movie_title, class]")
        # the sentence encoder that embeds item text (null: the sequence encoder's pretrained model); item text
        # without item_text_fields is refused there
        self.text_model_name_or_path: str | None = text_model(config)
        # the ID part of id+text: capped relative to the text vector, dropped in training (text-anchored items)
        self.id_max_norm, self.id_dropout_prob, self.text_token_bag = anchor_settings(config)

    def item_table(self) -> torch.Tensor:
        """Every item's representation, ``[n_items, hidden]`` (row 0 is padding)."""
        if self._baked_item_table is not None:
            return self._baked_item_table
        if self.item_repr == "id":
            return self.item_embedding.weight
        text = self.text_embeddings if self.text_encoder_mode == "frozen" else self._encode_texts()
        text = self.text_projection(text)
        if self.token_bag is not None:
            text = text + self.token_bag(self.text_input_ids)
        ids = self.item_embedding.weight
        if self.item_repr == "text":
            table = text
        else:
            table = text + self.id_correction(text)
        table = torch.where(self.item_has_text.unsqueeze(-1), table, ids)  # items without text: their ID
        return table

    def id_correction(self, text: torch.Tensor) -> torch.Tensor:
        """The ID part of ``id+text`` items, ``[n_items, hidden]``, given their projected text vectors ``text``.

        Uncapped (``id_max_norm`` null): the ID embeddings as they are. Capped: each row's norm clipped to
        ``id_max_norm`` times its text vector's norm, and zero for items without interactions in the training
        split (their ID never trained: they are their text, as items added to an artifact later are). In
        training, ``id_dropout_prob`` of the items lose it for the step.
        """
        correction = self.item_embedding.weight
        if self.id_max_norm is not None:
            limit = self.id_max_norm * text.norm(dim=-1, keepdim=True)
            correction = bounded(correction, limit) * self.item_trained.unsqueeze(-1)
        if self.training and self.id_dropout_prob > 0:
            kept = torch.rand(correction.size(0), 1, device=correction.device) >= self.id_dropout_prob
            correction = correction * kept
        return correction

    def bake_item_table(self) -> None:
        """Fix the item representations for inference and export (text encoded once, not per call)."""
        training, self.training = self.training, False  # no ID dropout frozen into the table
        try:
            with torch.no_grad():
                self._baked_item_table = self.item_table().detach().clone()
        finally:
            self.training = training

    def encode_items(self, item_seq: torch.Tensor, item_table: torch.Tensor | None = None) -> torch.Tensor:
        """The vectors fed to the encoder for a batch of item-id sequences, ``[batch, length, hidden]``."""
        if item_table is None and self.item_repr == "id" and self._baked_item_table is None:
            item_emb = self.item_embedding(item_seq)
        else:
            item_emb = nn.functional.embedding(item_seq, self.item_table() if item_table is None else item_table)
        if self.pre_encoder is not None:
            # RecBole pads at the end, so a left-to-right LSTM never sees padding before a real item.
            states, _ = self.pre_encoder(item_emb)
            item_emb = item_emb + states if self.pre_encoder_type == "lstm_residual" else states
        return item_emb

    def run_encoder(self, **inputs):
        """The encoder's forward (subclasses route it through their adapters)."""
        return self.encoder(**inputs)

    def encoder_output(self, item_seq: torch.Tensor, item_table: torch.Tensor | None = None):
        inputs = self.encode_items(item_seq, item_table)
        return self.run_encoder(inputs_embeds=inputs, attention_mask=self.sequence_mask(item_seq, inputs.dtype))

    def sequence_mask(self, item_seq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The encoder's attention mask for a batch of item sequences ``[batch, length]``.

        ``train_positions: last``: ``[batch, length]``, 1 on real items (bidirectional attention).
        ``all``: an additive ``[batch, 1, length, length]`` mask in ``dtype``, 0 where position q may attend
        to key k (k <= q and item k is real, or k = q) and the dtype's minimum elsewhere: a causal encoder, so
        that every position predicts its next item without seeing it. A position always sees itself: one whose
        own and earlier items are all masked (the ``mask`` augmentation) would otherwise have no key left, and
        a fully blocked row's softmax spreads evenly over every position, later ones and its target included.
        Built from the input's shape only (traceable).
        """
        real = item_seq != 0
        if self.train_positions == "last":
            return real.long()
        order = torch.cumsum(torch.ones_like(item_seq[0]), 0)  # [length] 1..length, from the input's shape
        earlier = order.unsqueeze(0) <= order.unsqueeze(1)  # [q, k]
        itself = order.unsqueeze(0) == order.unsqueeze(1)
        allowed = (earlier.unsqueeze(0) & real.unsqueeze(1)) | itself.unsqueeze(0)  # [B, q, k]
        blocked = torch.zeros(allowed.shape, dtype=dtype, device=item_seq.device)
        return blocked.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)

    def __str__(self) -> str:
        """What RecBole logs at the start of a run: the encoder that runs (its real size, whatever the random
        encoder's keys say) and each part's parameters, one line each. ``repr(model)`` is the module tree."""
        from recbole.utils import set_color

        def counted(module: nn.Module) -> str:
            total = sum(p.numel() for p in module.parameters())
            trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
            return f"{total:,} parameters" + ("" if trained == total else f", {trained:,} trained")

        encoder = self.encoder.config
        lines = [f"{type(self).__name__}: {self.pretrained_model_name_or_path or 'random encoder'} "
                 f"({encoder.num_hidden_layers} layer{'s' * (encoder.num_hidden_layers != 1)}, hidden {encoder.hidden_size}), item_repr {self.item_repr}, "
                 f"pre_encoder {self.pre_encoder_type}, train_positions {self.train_positions}, loss {self.loss_type}"]
        if "text" in self.item_repr:  # where item text comes from, and the widths the projection joins
            lines[0] += (f", item text: {self.text_model_name_or_path} {self.text_encoder_mode} "
                         f"({self.text_width} -> {self.hidden_size})")
        lines += [f"  {name}: {type(child).__name__}, {counted(child)}" for name, child in self.named_children()
                  if any(True for _ in child.parameters())]
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return "\n".join(lines) + set_color("\nTrainable parameters", "blue") + f": {trainable}"

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, item_table: torch.Tensor | None = None):
        item_seq, item_seq_len = most_recent(item_seq, item_seq_len, self.max_seq_length)
        hidden = self.encoder_output(item_seq, item_table).last_hidden_state
        return self.gather_indexes(hidden, item_seq_len - 1)  # [B, H]

    def calculate_loss(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        table = self.item_table()  # once per step: with a trained text encoder it encodes every item
        pos_items = interaction[self.POS_ITEM_ID]
        if self.train_positions == "all":
            return self.all_positions_loss(item_seq, item_seq_len, pos_items, table)
        seq_output = self.forward(item_seq, item_seq_len, table)
        if self.loss_type == "BPR":
            neg_items = interaction[self.NEG_ITEM_ID]
            pos_score = (seq_output * table[pos_items]).sum(dim=-1)
            neg_score = (seq_output * table[neg_items]).sum(dim=-1)
            return self.loss_fct(pos_score, neg_score)
        return full_softmax_cross_entropy(seq_output, table, pos_items)

    def all_positions_loss(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, pos_items: torch.Tensor,
                           table: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the next item at the scored positions of each (causally encoded) sequence (see
        :meth:`next_item_targets`). SASRec's training objective (Kang & McAuley, ICDM 2018), with the full
        softmax of SASRec+/gSASRec (Klenitskiy & Vasilev, RecSys 2023)."""
        item_seq, item_seq_len = most_recent(item_seq, item_seq_len, self.max_seq_length)
        hidden = self.encoder_output(item_seq, table).last_hidden_state  # [B, L, H]
        targets, scored = self.next_item_targets(item_seq, item_seq_len, pos_items)
        return full_softmax_cross_entropy(hidden[scored], table, targets[scored])

    def next_item_targets(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor,
                          pos_items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each position's target and whether the loss scores it, both ``[batch, length]``.

        Position t's target is item t + 1 of the history, and the last position's is ``pos_items``. Scored: the
        last ``train_window_stride`` real positions of each row (all of them with non-overlapping windows), so
        that rows kept every stride targets predict each target once; padded positions and items an
        augmentation masked (target 0) are never scored.
        """
        targets = torch.cat((item_seq[:, 1:], torch.zeros_like(item_seq[:, :1])), dim=1)
        targets = targets.scatter(1, (item_seq_len - 1).unsqueeze(-1), pos_items.unsqueeze(-1))
        positions = torch.arange(item_seq.size(1), device=item_seq.device)
        last = item_seq_len.unsqueeze(-1)
        scored = (positions < last) & (positions >= last - self.train_window_stride) & (targets != 0)
        return targets, scored

    def predict(self, interaction):
        table = self.item_table()
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], table)
        return (seq_output * table[interaction[self.ITEM_ID]]).sum(dim=1)  # [B]

    def full_sort_predict(self, interaction):
        """``export_scores`` of RecBole's evaluation batch, encoded in groups of rows of similar history length,
        each cut to its longest history (:data:`EVAL_GROUP_ROWS` rows a group).

        Trailing padding costs the encoder as much as items do (ml-1m at history 200: 46% of the positions), and
        it changes no real position's output: each row is encoded on its own, and the attention mask hides
        padding from real positions (causal or not), so the scores are ``export_scores``' to float rounding.
        Grouping uses the batch's values, so the traced export keeps ``export_scores``.
        """
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        table = self.item_table()  # once: with a trained text encoder it encodes every item
        hidden = table.new_empty((item_seq.size(0), table.size(1)))
        for rows in torch.argsort(item_seq_len).split(EVAL_GROUP_ROWS):
            width = max(int(item_seq_len[rows].max()), 1)
            hidden[rows] = self.forward(item_seq[rows, :width], item_seq_len[rows], table)
        return hidden @ table.t()

    # --- recbole_llm.model.contract.PluginModel -------------------------------------------------------------

    def export_scores(self, item_seq: torch.Tensor, item_length: torch.Tensor) -> torch.Tensor:
        """Every item's score, ``[batch, n_items]``: what ``full_sort_predict`` returns, traceable (branches
        depend only on the model's settings and the input's width, never on the batch's values)."""
        table = self.item_table()
        return self.forward(item_seq, item_length, table) @ table.t()

    def user_vectors(self, item_seq: torch.Tensor, item_length: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
        """The history representation ``[batch, hidden]`` that scores item ``i`` as ``user_vectors @ item_table[i]``:
        what an artifact with an item index exports, with ``item_table`` ``[n_items, hidden]`` a graph input
        (items added after training have rows there, and histories may hold them). Traceable."""
        return self.forward(item_seq, item_length, item_table)

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight: the whole model is fine-tuned."""
        return self.state_dict()

    # state-dict entries with a row per item (or per catalogue text token): init_from maps them by token
    ITEM_ROWS = ("item_embedding.weight", "item_trained", "token_bag.token_rows", "token_bag.embedding.weight")

    def carry_over(self, state: dict[str, torch.Tensor], item_source: torch.Tensor) -> dict[str, torch.Tensor]:
        """A checkpoint's state dict (of this model class, trained on other data) fitted to this model's items
        (``init_from``): ``item_source`` ``[n_items]`` gives each item here its row in the checkpoint, -1 for
        items new here (and padding). New items keep this model's fresh rows (with item text: zero, so that they
        start as their text alone, as add-items has them, not with a random ID part); a trained item stays trained
        (its capped ID correction counts) even without interactions in the new training split; the token bag's
        rows follow the tokenizer's ids. Everything else is returned as it is (shapes checked on loading).
        """
        state, own = dict(state), self.state_dict()
        known = item_source >= 0
        if "item_embedding.weight" in state:
            rows = own["item_embedding.weight"].clone()
            rows[known] = state["item_embedding.weight"][item_source[known]].to(rows.dtype)
            if "text" in self.item_repr:  # new items start as their text alone (as add-items has them), with an
                rows[~known] = 0  # ID part that trains from zero rather than a random one beside trained items'
            state["item_embedding.weight"] = rows
        if "item_trained" in own:
            trained = own["item_trained"].clone()
            if "item_trained" in state:
                trained[known] |= state["item_trained"][item_source[known]].bool()
            state["item_trained"] = trained
        if self.token_bag is not None and "token_bag.token_rows" in state:
            rows_then, rows_now = state["token_bag.token_rows"], own["token_bag.token_rows"]
            if rows_then.shape != rows_now.shape:  # another tokenizer: refused on loading, as any misfit
                return state
            vectors = own["token_bag.embedding.weight"].clone()  # tokens new here: zero, as at the start
            both = (rows_now > 0) & (rows_then > 0)
            vectors[rows_now[both]] = state["token_bag.embedding.weight"][rows_then[both]].to(vectors.dtype)
            state["token_bag.token_rows"], state["token_bag.embedding.weight"] = rows_now, vectors
        return state

    def after_optimizer_step(self, global_step: int) -> None:
        """Nothing to do after an optimizer step (AdaLoRA reallocates ranks here)."""

    def merge_adapters(self) -> bool:
        """No adapters: nothing merges."""
        return False
