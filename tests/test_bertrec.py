"""BERTRec learns through RecBole's own trainer and evaluator, and reloads to identical scores."""

from __future__ import annotations

import pytest
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.quick_start import load_data_and_model
from recbole.utils import get_model, get_trainer, init_seed

from conftest import LEARNING_DATASET, bundled
from recbole_llm import RecboleLLMError
from recbole_llm.export.graph import ScoringGraph
from recbole_llm.model.backbone import DEFAULT_PRETRAINED
from recbole_llm.model.full_softmax import full_softmax_cross_entropy


def train(config_dict: dict, epochs: int, dataset: str = "ml-slice"):
    """RecBole's own pipeline, step by step, so the test can look at the losses and the trainer."""
    config = Config(model="BERTRec", dataset=dataset, config_dict={**config_dict, "epochs": epochs})
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.fit(train_data, valid_data, show_progress=False)
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    return trainer, test_data, test_result


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "epochs"),
    [
        # decoupled widths: the small random encoder over the 384-wide sentence encoder's item text (projected)
        # (one row per window of 20, as below: a tenth of the prefix rows' work)
        pytest.param({"loss_type": "CE", "train_positions": "all", "train_batch_size": 16, "learning_rate": 0.002,
                      "item_repr": "id+text",
                      "text_model_name_or_path": DEFAULT_PRETRAINED, "item_text_fields": ["movie_title", "class"],
                      "load_col": {"inter": ["user_id", "item_id", "timestamp"],
                                   "item": ["item_id", "movie_title", "class"]}}, 5, id="CE-text"),
        # one row per window of 20: ~1/10 of the prefix rows, so smaller batches for as many steps; with the LSTM
        # pre-encoder, as the benchmarks' best setting (one training run for both, the suite's time is budgeted)
        pytest.param({"loss_type": "CE", "train_positions": "all", "train_batch_size": 16, "learning_rate": 0.002,
                      "pre_encoder": "lstm"}, 6, id="CE-all+LSTM"),
    ],
)
def test_learns_beyond_popularity(tiny_bert, pop_ndcg, variant, epochs):
    trainer, _, test_result = train(bundled({**tiny_bert, **variant}), epochs, dataset=LEARNING_DATASET)
    losses = [trainer.train_loss_dict[epoch] for epoch in sorted(trainer.train_loss_dict)]
    print(f"\n{variant}: test NDCG@10 {test_result['ndcg@10']:.4f} vs Pop {pop_ndcg:.4f}; losses {losses}")
    assert losses[-1] < 0.95 * losses[0], losses
    assert test_result["ndcg@10"] > pop_ndcg, (test_result, pop_ndcg)


@pytest.mark.slow
def test_bpr_learns(tiny_bert):
    """BPR with RecBole's one uniform negative learns, but slowly: on ml-100k three epochs reach test NDCG@10
    0.035 against a correctly counted Pop's 0.044, so its floor here is the same model untrained."""
    settings = {**tiny_bert, "loss_type": "BPR", "learning_rate": 0.005, "epochs": 4}
    config = Config(model="BERTRec", dataset="ml-slice", config_dict=settings)
    init_seed(config["seed"], config["reproducibility"])
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    model = get_model("BERTRec")(config, train_data._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "BERTRec")(config, model)
    untrained = trainer.evaluate(test_data, load_best_model=False, show_progress=False)["ndcg@10"]
    trainer.fit(train_data, valid_data, show_progress=False)
    trained = trainer.evaluate(test_data, load_best_model=True, show_progress=False)["ndcg@10"]
    losses = [trainer.train_loss_dict[epoch] for epoch in sorted(trainer.train_loss_dict)]
    print(f"\nBPR: test NDCG@10 {trained:.4f}, untrained {untrained:.4f}; losses {losses}")
    assert losses[-1] < 0.7 * losses[0], losses
    assert trained > 2 * untrained, (trained, untrained)


@pytest.mark.slow
@pytest.mark.parametrize("pre_encoder", ["lstm", "lstm_residual"])
def test_lstm_pre_encoder_runs_before_the_encoder(tiny_bert, pre_encoder):
    config = Config(model="BERTRec", dataset="ml-slice", config_dict={**tiny_bert, "pre_encoder": pre_encoder})
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    model = get_model("BERTRec")(config, train_data._dataset)
    assert isinstance(model.pre_encoder, torch.nn.LSTM)
    batch = next(iter(train_data))
    seen = []
    model.pre_encoder.register_forward_hook(lambda module, args, output: seen.append("lstm"))
    model.encoder.register_forward_hook(lambda module, args, output: seen.append("encoder"))
    model.calculate_loss(batch).backward()
    assert seen == ["lstm", "encoder"]
    assert model.pre_encoder.weight_ih_l0.grad is not None
    # S = LSTM(X), or X + LSTM(X) with the residual
    item_seq = batch[model.ITEM_SEQ][:4]
    with torch.no_grad():
        embedded = model.item_table()[item_seq]
        states, _ = model.pre_encoder(embedded)
        expected = embedded + states if pre_encoder == "lstm_residual" else states
        assert torch.allclose(model.encode_items(item_seq), expected)


@pytest.mark.slow
def test_checkpoint_reload_gives_identical_scores_and_resumes(tiny_bert):
    trainer, test_data, _ = train(tiny_bert, epochs=2)  # evaluate(load_best_model=True) loaded the best
    checkpoint = trainer.saved_model_file

    config, reloaded, _, _, _, reloaded_test = load_data_and_model(checkpoint)
    assert type(reloaded).__name__ == "BERTRec"
    trainer.model.eval()
    reloaded.eval()
    batch = next(iter(test_data))[0]
    reloaded_batch = next(iter(reloaded_test))[0]
    with torch.no_grad():
        expected = trainer.model.full_sort_predict(batch)
        actual = reloaded.full_sort_predict(reloaded_batch)
    assert torch.equal(expected, actual)

    # RecBole's resume path (Trainer.resume_checkpoint) also loads through the safe loader.
    resumed = get_trainer(config["MODEL_TYPE"], config["model"])(config, reloaded)
    resumed.resume_checkpoint(checkpoint)
    assert resumed.start_epoch >= 1


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"pre_encoder": "gru"}, "pre_encoder='gru' is not supported"),
        ({"hidden_size": 30, "n_heads": 4}, "hidden_size 30 is not a multiple of n_heads 4"),
    ],
)
def test_bad_model_settings_fail_before_training(tiny_bert, override, fragment):
    with pytest.raises(RecboleLLMError, match=fragment):  # at Config (encoder sizes) or at the model
        config = Config(model="BERTRec", dataset="ml-slice", config_dict={**tiny_bert, **override})
        dataset = create_dataset(config)
        get_model("BERTRec")(config, dataset)


@pytest.mark.slow
@pytest.mark.parametrize("stride", [None, 2])
def test_all_positions_trains_each_target_once_per_epoch(tiny_bert, stride):
    """train_positions: all keeps one training row every train_window_stride targets (by default
    MAX_ITEM_LIST_LENGTH), counted back from each user's most recent one; the positions the model scores in the
    kept rows hold every training target once, each predicted from at least MAX_ITEM_LIST_LENGTH - stride + 1
    items when the history has them."""

    def training_rows(settings):
        config = Config(model="BERTRec", dataset="ml-slice", config_dict=settings)
        train = data_preparation(config, create_dataset(config))[0]._dataset
        return config, train, train.item_counter

    length = 5
    settings = {**tiny_bert, "MAX_ITEM_LIST_LENGTH": length}
    _, every, counts = training_rows(settings)
    every = every.inter_feat
    config, train, window_counts = training_rows({**settings, "train_positions": "all",
                                                  "train_window_stride": stride})
    kept = train.inter_feat
    assert window_counts == counts  # training interactions per item (the tail metrics' threshold) unchanged
    model = get_model("BERTRec")(config, train)
    step = stride or length
    uid, iid = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
    seq_field, len_field = config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"], config["ITEM_LIST_LENGTH_FIELD"]
    for user in every[uid].unique().tolist()[:30]:
        targets = every[iid][every[uid] == user].tolist()  # every prefix row's target, oldest first
        mine = kept[uid] == user
        assert int(mine.sum()) == -(-len(targets) // step)  # ceil(rows / stride)
        row_targets, scored = model.next_item_targets(kept[seq_field][mine], kept[len_field][mine], kept[iid][mine])
        covered = row_targets[scored].tolist()  # what the loss predicts, rows oldest first
        assert covered == targets
        before = scored.nonzero()[:, 1] + 1  # items of the row each scored target is predicted from
        index_in_history = torch.arange(1, len(targets) + 1)
        assert torch.all(before >= torch.clamp(index_in_history, max=length - step + 1))
    assert len(kept) < len(every) / (3 if stride is None else 1.5)


def test_train_window_stride_needs_all_positions_and_a_length_it_fits(tiny_bert):
    for override, words in [({"train_window_stride": 2}, "applies to train_positions: all only"),
                            ({"train_positions": "all", "train_window_stride": 0},
                             r"from 1 to \d+: .* \(MAX_ITEM_LIST_LENGTH is"),
                            ({"train_positions": "all", "MAX_ITEM_LIST_LENGTH": 5, "train_window_stride": 6},
                             r"from 1 to 5: .* \(MAX_ITEM_LIST_LENGTH is 5\)"),
                            ({"train_positions": "all", "train_window_stride": 2,
                              "benchmark_filename": ["train", "valid", "test"],
                              "alias_of_item_id": ["item_id_list"]}, "pre-split data")]:
        with pytest.raises(RecboleLLMError, match=words):  # when the Config is built, before any data is read
            Config(model="BERTRec", dataset="ml-slice", config_dict={**tiny_bert, **override})


@pytest.mark.slow
def test_saved_dataloaders_of_another_window_stride_are_rebuilt(tiny_bert, tmp_path):
    """Dataloaders saved with other training windows are not reused: RecBole compares only its own keys, and
    rows cut every 5 targets, scored 2 positions each, would train on 2 targets in 5 with no error."""
    settings = {**tiny_bert, "train_positions": "all", "MAX_ITEM_LIST_LENGTH": 5, "checkpoint_dir": str(tmp_path)}
    config = Config(model="BERTRec", dataset="ml-slice", config_dict={**settings, "save_dataloaders": True})
    saved_rows = len(data_preparation(config, create_dataset(config))[0]._dataset)
    saved = next(tmp_path.glob("*-dataloader.pth"))
    for stride in (None, 2):
        config = Config(model="BERTRec", dataset="ml-slice",
                        config_dict={**settings, "dataloaders_save_path": str(saved), "train_window_stride": stride})
        rows = len(data_preparation(config, create_dataset(config))[0]._dataset)
        assert (rows == saved_rows) == (stride is None)
        assert rows > 2 * saved_rows or stride is None


@pytest.mark.slow
def test_all_positions_encoder_is_causal_and_exports_the_same_scores(tiny_bert):
    """With train_positions: all, a position never sees a later item (so the last position of a prefix scores
    as the whole prefix does), and export_scores, traced, equals full_sort_predict."""
    config = Config(model="BERTRec", dataset="ml-slice", config_dict={**tiny_bert, "train_positions": "all"})
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    model = get_model("BERTRec")(config, train_data._dataset).eval()
    batch = next(iter(train_data))
    item_seq, length = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    long_enough = length >= 3
    item_seq, length = item_seq[long_enough][:8], length[long_enough][:8]
    with torch.no_grad():
        hidden = model.encoder_output(item_seq).last_hidden_state
        cut = item_seq * (torch.arange(item_seq.size(1)) < 2)  # only the first two items
        prefix_hidden = model.encoder_output(cut).last_hidden_state
        assert torch.allclose(hidden[:, :2], prefix_hidden[:, :2], atol=1e-5)
        assert not torch.allclose(hidden[:, 2], prefix_hidden[:, 2], atol=1e-3)
        # The mask augmentation pads older items: a position whose own and earlier items are all masked still
        # sees nothing later (a fully blocked attention row would spread over every position, its target's too).
        masked = item_seq.clone()
        masked[:, :2] = 0
        other = torch.where(masked > 0, masked % (model.n_items - 1) + 1, masked)  # other later items
        first = model.encoder_output(masked).last_hidden_state[:, :2]
        assert torch.allclose(first, model.encoder_output(other).last_hidden_state[:, :2], atol=1e-5)
        traced = torch.jit.trace(ScoringGraph(model, top_k=None), (item_seq[:4], length[:4]), check_trace=False)
        expected = model.full_sort_predict({model.ITEM_SEQ: item_seq, model.ITEM_SEQ_LEN: length})
        assert torch.allclose(traced(item_seq, length), expected, atol=1e-5)


def test_full_softmax_loss_equals_cross_entropy_over_every_item(tiny_bert):
    """The chunked full softmax (torch's linear_cross_entropy on CPU) gives RecBole's CE loss and gradients:
    for the function at a shape it chunks, and for an all-positions model's training loss."""
    torch.manual_seed(0)
    hidden = torch.randn(600, 16, requires_grad=True)
    table = torch.randn(500, 16, requires_grad=True)
    targets = torch.randint(1, 500, (600,))
    full_softmax_cross_entropy(hidden, table, targets).backward()
    grads = hidden.grad.clone(), table.grad.clone()
    hidden.grad = table.grad = None
    expected = torch.nn.functional.cross_entropy(hidden @ table.t(), targets)
    expected.backward()
    assert torch.allclose(full_softmax_cross_entropy(hidden, table, targets), expected, atol=1e-5)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-6) and torch.allclose(grads[1], table.grad, atol=1e-6)

    config = Config(model="BERTRec", dataset="ml-slice", config_dict={**tiny_bert, "train_positions": "all"})
    train_data = data_preparation(config, create_dataset(config))[0]
    model = get_model("BERTRec")(config, train_data._dataset).eval()
    batch = next(iter(train_data))
    item_seq, length, pos = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN], batch[model.POS_ITEM_ID]
    with torch.no_grad():
        table = model.item_table()
        hidden = model.encoder_output(item_seq, table).last_hidden_state
        targets, scored = model.next_item_targets(item_seq, length, pos)
        expected = torch.nn.functional.cross_entropy(hidden[scored] @ table.t(), targets[scored])
        assert torch.allclose(model.calculate_loss(batch), expected, atol=1e-5)
