"""The GPU path: mixed-precision training, DDP over nccl, ONNX Runtime's CUDA provider, serving on it.

Run with ``pytest -m gpu``; every test skips cleanly on a machine without CUDA (this project's CI), and
runs on a lent GPU machine through the device kit (``benchmarks/gpu/``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import LEARNING_DATASET, bundled, train_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pytest -m gpu on a GPU machine)"),
]


def ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


needs_ort_cuda = pytest.mark.skipif(not ort_has_cuda(), reason="needs onnxruntime-gpu's CUDAExecutionProvider")


def train(model: str, precision: str, config: dict, epochs: int = 8):
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    config = Config(model=model, dataset=LEARNING_DATASET, config_dict={
        **bundled(config), "train_positions": "all", "train_batch_size": 16, "learning_rate": 0.002, "epochs": epochs, "mixed_precision": precision, "gpu_id": "0", "use_gpu": True})
    assert config["device"].type == "cuda"
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.fit(train_data, valid_data, show_progress=False)
    result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    return trainer, test_data, result


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("model", ["BERTRec", "BERTLoRA"])
def test_mixed_precision_training_learns_and_reloads(model, precision, tiny_bert, pop_ndcg, tmp_path):
    from recbole.quick_start import load_data_and_model

    trainer, test_data, result = train(model, precision, tiny_bert)
    losses = [trainer.train_loss_dict[epoch] for epoch in sorted(trainer.train_loss_dict)]
    print(f"\n{model} {precision}: NDCG@10 {result['ndcg@10']:.4f} vs Pop {pop_ndcg:.4f}; losses {losses}")
    assert trainer.autocast_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert losses[-1] < 0.9 * losses[0], losses
    assert result["ndcg@10"] > pop_ndcg, (result, pop_ndcg)

    batch = next(iter(test_data))[0].to("cuda")
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model.full_sort_predict(batch).float().cpu()
    _, reloaded, _, _, _, _ = load_data_and_model(trainer.saved_model_file)
    reloaded.eval()
    with torch.no_grad():
        on_gpu = reloaded.full_sort_predict(batch).float().cpu()
        on_cpu = reloaded.cpu().full_sort_predict(batch.to("cpu")).float()
    assert torch.equal(on_gpu, expected)
    assert torch.allclose(on_cpu, expected, atol=1e-3, rtol=1e-3)


def test_ddp_over_nccl_with_one_rank(data_root, tmp_path):
    load_col = json.dumps({"inter": ["user_id", "item_id", "timestamp"]})
    run = subprocess.run([
        sys.executable, "-m", "recbole_llm", "run", "--model=BERTLoRA", "--dataset=ml-tiny", "--nproc=1",
        f"--data_path={data_root}", f"--load_col={load_col}", "--pretrained_model_name_or_path=None",
        "--hidden_size=32", "--inner_size=64", "--n_layers=1", "--MAX_ITEM_LIST_LENGTH=12", "--epochs=2",
        "--show_progress=False", "--gpu_id=0", "--ip=127.0.0.1", "--port=29533",
        f"--checkpoint_dir={tmp_path / 'saved'}",
    ], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "test result" in log and re.search(r"nccl", log, re.IGNORECASE), log[-3000:]


@pytest.fixture(scope="module")
def gpu_checkpoint(data_root, tmp_path_factory) -> str:
    return str(train_checkpoint(tmp_path_factory.mktemp("gpu-export"), "BERTLoRA", "ml-slice", {
        "data_path": str(data_root), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "pretrained_model_name_or_path": None, "hidden_size": 64, "inner_size": 128, "n_layers": 1,
        "MAX_ITEM_LIST_LENGTH": 20, "epochs": 4, "learning_rate": 0.003, "gpu_id": "0"}))


@needs_ort_cuda
def test_export_on_cuda_fp32_and_fp16(gpu_checkpoint, tmp_path):
    from recbole_llm.export import ExportOptions, export_checkpoint

    fp32 = export_checkpoint(gpu_checkpoint, tmp_path / "fp32", ExportOptions(top_k=10, max_abs_diff=1e-3)).path
    (report,) = json.loads((fp32 / "metadata.json").read_text())["validation"]
    assert report["passed"] and report["max_abs_diff"] <= 1e-3, report
    assert report["top10_order_mismatches_beyond_ties"] == 0, report
    fp16 = export_checkpoint(gpu_checkpoint, tmp_path / "fp16", ExportOptions(top_k=10, fp16=True)).path
    reports = json.loads((fp16 / "metadata.json").read_text())["validation"]
    assert reports[-1]["precision"] == "fp16" and reports[-1]["top10_overlap"] >= 0.95, reports


@needs_ort_cuda
def test_runtime_and_service_run_on_the_cuda_provider(gpu_checkpoint, tmp_path):
    from helpers import Service

    from recbole_llm.export import ExportOptions, export_checkpoint
    from recbole_llm.serving.runtime import Recommender

    artifact = export_checkpoint(gpu_checkpoint, tmp_path / "a", ExportOptions(top_k=10, max_abs_diff=1e-3)).path
    on_gpu = Recommender(artifact)
    on_cpu = Recommender(artifact, providers=["CPUExecutionProvider"])
    assert on_gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    histories = [on_gpu.tokens[1:9], on_gpu.tokens[20:23], on_gpu.tokens[40:41]]
    got = on_gpu.recommend(histories, k=10)
    want = on_cpu.recommend(histories, k=10)
    for g, w in zip(got, want):
        assert len(set(g.items) & set(w.items)) >= 9
        assert np.allclose(g.scores, w.scores, atol=1e-3)
    service = Service(str(artifact))
    try:
        status, metadata = service.get("/metadata")
        assert status == 200 and metadata["service"]["providers"][0] == "CUDAExecutionProvider"
        status, body = service.recommend({"histories": histories, "k": 10})
        assert status == 200
        assert [r["items"] for r in body["recommendations"]] == [list(g.items) for g in got]
    finally:
        service.close()
