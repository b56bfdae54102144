"""ONNX export: every model family to a validated artifact, loaded by ONNX Runtime in a separate process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import train_checkpoint
from recbole_llm import RecboleLLMError
from recbole_llm.export import ExportOptions, ScoringGraph, export_checkpoint, load_for_export, validation_inputs
from recbole_llm.serving.runtime import Recommender

SMALL_RECBOLE = {"hidden_size": 32, "inner_size": 64, "n_layers": 1, "n_heads": 2, "embedding_size": 32}
MODELS = {
    "BERTRec": {"pretrained_model_name_or_path": None, **SMALL_RECBOLE},
    # the converged profile's strongest setting: an LSTM under a causal encoder trained at every position
    "BERTRec-all-lstm": {"pretrained_model_name_or_path": None, "pre_encoder": "lstm", "train_positions": "all",
                         **SMALL_RECBOLE},
    "BERTLoRA": {"pretrained_model_name_or_path": None, **SMALL_RECBOLE},
    "BERTAdapter": {"pretrained_model_name_or_path": None, "adapter_size": 8, **SMALL_RECBOLE},
    "SASRec": SMALL_RECBOLE,
    "GRU4Rec": SMALL_RECBOLE,
    "BERT4Rec": SMALL_RECBOLE,
}
MODEL_OF = {"BERTRec-all-lstm": "BERTRec"}  # a setting's RecBole model; other keys are the model's name


@pytest.fixture(scope="module")
def checkpoints(data_root, tmp_path_factory) -> dict[str, str]:
    """Each model trained briefly on the slice with RecBole's run_recbole; its best checkpoint."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return {name: str(train_checkpoint(folder / name, MODEL_OF.get(name, name), "ml-tiny", {
        "data_path": str(data_root), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": 12, "epochs": 1, "learning_rate": 0.003, "train_batch_size": 512, **settings}))
        for name, settings in MODELS.items()}


def pytorch_top10(checkpoint: str, item_seq: np.ndarray, item_length: np.ndarray) -> np.ndarray:
    _, model, _, _ = load_for_export(checkpoint)
    with torch.no_grad():
        scores = ScoringGraph(model, None)(torch.from_numpy(item_seq), torch.from_numpy(item_length))
    scores[:, 0] = -torch.inf
    return torch.topk(scores, 10, dim=1).indices.numpy()


ORT_IN_A_FRESH_PROCESS = """
import sys, numpy as np, onnxruntime as ort
inputs = np.load(sys.argv[2])
session = ort.InferenceSession(sys.argv[1] + "/model.onnx", providers=["CPUExecutionProvider"])
feeds = {"item_seq": inputs["item_seq"], "item_length": inputs["item_length"],
         "exclude_items": np.zeros((len(inputs["item_seq"]), 1), dtype=np.int64)}
top_items, top_scores = session.run(["top_items", "top_scores"], feeds)
np.save(sys.argv[3], top_items)
"""


@pytest.mark.slow
@pytest.mark.parametrize("model_name", list(MODELS))
def test_export_validates_and_a_fresh_process_ranks_like_pytorch(model_name, checkpoints, tmp_path):
    artifact = export_checkpoint(checkpoints[model_name], tmp_path / "artifact", ExportOptions(top_k=10)).path
    metadata = json.loads((artifact / "metadata.json").read_text())
    (report,) = metadata["validation"]
    assert report["passed"] and report["max_abs_diff"] <= 1e-4
    assert report["lengths"][0] == 1 and report["lengths"][-1] == 12  # length 1 and the maximum
    assert metadata["model"] == MODEL_OF.get(model_name, model_name) and metadata["max_length"] == 12
    assert metadata["adapters_merged"] == (model_name == "BERTLoRA")
    assert {"recbole", "torch", "opset", "recbole_llm"} <= set(metadata["versions"])
    import jsonschema

    jsonschema.validate(metadata, json.loads((Path(__file__).parents[1] / "export" / "metadata.schema.json").read_text()))
    import onnx

    props = {p.key: p.value for p in onnx.load(str(artifact / "model.onnx")).metadata_props}
    assert json.loads(props["item_tokens"]) == metadata["item_tokens"]

    # real test sequences at mixed lengths, in a separate process with a fresh ONNX Runtime session
    _, model, _, test_data = load_for_export(checkpoints[model_name])
    item_seq, item_length = validation_inputs(model, test_data, rows=40, seed=1)
    np.savez(tmp_path / "inputs.npz", item_seq=item_seq, item_length=item_length)
    subprocess.run(
        [sys.executable, "-c", ORT_IN_A_FRESH_PROCESS, str(artifact), str(tmp_path / "inputs.npz"),
         str(tmp_path / "out.npy")],
        check=True, timeout=120,
    )
    assert np.array_equal(np.load(tmp_path / "out.npy"), pytorch_top10(checkpoints[model_name], item_seq, item_length))


@pytest.mark.slow
def test_runtime_answers_raw_tokens_like_pytorch(checkpoints, tmp_path):
    checkpoint = checkpoints["BERTLoRA"]
    artifact = export_checkpoint(checkpoint, tmp_path / "artifact", ExportOptions(top_k=20)).path
    _, model, dataset, test_data = load_for_export(checkpoint)
    item_seq, item_length = validation_inputs(model, test_data, rows=16, seed=2)
    tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
    histories = [[tokens[i] for i in row[:n]] for row, n in zip(item_seq, item_length)]

    recommender = Recommender(artifact)
    answers = recommender.recommend(histories, k=10, exclude_seen=False)
    expected = pytorch_top10(checkpoint, item_seq, item_length)
    assert [a.items for a in answers] == [[tokens[i] for i in row] for row in expected]

    # excluding the history, and a history longer than the model keeps its most recent items
    for answer, history in zip(recommender.recommend(histories, k=10), histories):
        assert not set(answer.items) & set(history)
    long_history = histories[0] * 5
    assert recommender.recommend([long_history], k=5)[0] == recommender.recommend([long_history[-12:]], k=5)[0]

    # unknown tokens: skipped and counted, or an error under the strict policy; empty history: an error
    (answer,) = recommender.recommend([histories[0] + ["no-such-item"]], k=5)
    assert answer.unknown_tokens == 1
    with pytest.raises(RecboleLLMError, match="unknown item tokens"):
        Recommender(artifact, unknown_tokens="error").recommend([["no-such-item", histories[0][0]]])
    with pytest.raises(RecboleLLMError, match="history 0 is empty"):
        recommender.recommend([[]])
    with pytest.raises(RecboleLLMError, match="k=50 is out of range"):
        recommender.recommend(histories, k=50)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [{"optimize": True}, {"int8": True}, {"optimize": True, "int8": True}])
def test_optimized_and_int8_artifacts_load_and_pass(checkpoints, tmp_path, flags):
    artifact = export_checkpoint(checkpoints["BERTRec"], tmp_path / "artifact", ExportOptions(top_k=10, **flags)).path
    metadata = json.loads((artifact / "metadata.json").read_text())
    assert all(report["passed"] for report in metadata["validation"])
    if flags.get("optimize"):  # attention too: exported in the form ONNX Runtime's BERT optimizer fuses
        assert metadata["fused_operators"].get("SkipLayerNormalization", 0) >= 1
        assert metadata["fused_operators"].get("Attention", 0) >= 1, metadata["fused_operators"]
    if flags.get("int8"):
        assert metadata["precision"] == "int8"
        if flags.get("optimize"):  # fused attention is quantized too
            assert metadata["validation"][-1]["quantized_operators"].get("QAttention", 0) >= 1, metadata["validation"]
        assert metadata["validation"][-1]["top10_overlap"] >= 0.95
    answers = Recommender(artifact).recommend([metadata["item_tokens"][1:4]], k=5)
    assert len(answers[0].items) == 5


@pytest.mark.slow
def test_triton_repository_parses_against_tritons_schema(checkpoints, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    artifact = export_checkpoint(checkpoints["SASRec"], tmp_path / "artifact", ExportOptions(top_k=10, triton=True)).path
    config = text_format.Parse(
        (artifact / "triton" / "sasrec" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.backend == "onnxruntime" and config.max_batch_size > 0
    assert config.HasField("dynamic_batching")
    assert [i.name for i in config.input] == ["item_seq", "item_length", "exclude_items"]
    assert (artifact / "triton" / "sasrec" / "1" / "model.onnx").read_bytes() == (artifact / "model.onnx").read_bytes()


@pytest.mark.slow
def test_failed_validation_leaves_no_artifact(checkpoints, tmp_path):
    parent = tmp_path / "artifacts"
    with pytest.raises(RecboleLLMError, match="failed validation.*no artifact was written"):
        export_checkpoint(checkpoints["GRU4Rec"], parent / "artifact", ExportOptions(max_abs_diff=-1.0)).path
    assert list(parent.iterdir()) == []  # neither the artifact nor a half-written staging folder


@pytest.mark.slow
def test_export_command_line_errors(checkpoints, tmp_path):
    from helpers import Payload, assert_one_line_error, cli

    evil = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"
    torch.save({"config": Payload(marker), "state_dict": {}}, evil)
    assert_one_line_error(cli("export", f"--checkpoint={evil}", f"--output={tmp_path / 'out'}"), "refusing to load")
    assert not marker.exists() and not (tmp_path / "out").exists()
    result = cli("export", f"--checkpoint={checkpoints['SASRec']}", f"--output={tmp_path / 'out'}", "--fp16")
    assert_one_line_error(result, "--fp16 needs a GPU")
    existing = tmp_path / "taken"
    existing.mkdir()
    assert_one_line_error(
        cli("export", f"--checkpoint={checkpoints['SASRec']}", f"--output={existing}"), "exists", "--force"
    )
    ok = cli("export", f"--checkpoint={checkpoints['SASRec']}", f"--output={tmp_path / 'sasrec'}", "--top-k=5")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "validated fp32" in ok.stdout and (tmp_path / "sasrec" / "model.onnx").is_file()
    quiet = cli("export", f"--checkpoint={checkpoints['BERTRec']}", f"--output={tmp_path / 'int8'}", "--optimize",
                "--int8")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    # what a user needs, not RecBole's config dump or ONNX Runtime's INFO lines: a line per validation, and where
    assert len((quiet.stdout + quiet.stderr).strip().splitlines()) == 4, quiet.stdout + quiet.stderr
    assert "fused {" in quiet.stdout and "int8 {" in quiet.stdout
