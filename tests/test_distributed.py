"""RecBole's distributed data-parallel training of a plugin model on two CPU processes (gloo), launched as
users launch it: ``recbole-llm run --nproc=2`` (RecBole's ``run``, which spawns the ranks)."""

from __future__ import annotations

import ast
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recbole_llm.checkpoint.loading import load_checkpoint

# No dropout: with it, each rank draws its own masks. Without it, two ranks each taking half of every
# global batch compute the same averaged gradient as one process taking the whole batch, so the runs
# below must agree up to floating-point summation order.
TOLERANCE = 0.002  # absolute, on NDCG@10 and Recall@10 (valid and test)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(data_root: Path, folder: Path, *launch_options: str) -> tuple[str, dict, dict]:
    load_col = json.dumps({"inter": ["user_id", "item_id", "timestamp"]})
    command = [
        sys.executable, "-m", "recbole_llm", "run", "--model=BERTLoRA", "--dataset=ml-tiny",
        f"--data_path={data_root}", f"--load_col={load_col}", "--pretrained_model_name_or_path=None",
        "--hidden_size=32", "--inner_size=64", "--n_layers=1", "--MAX_ITEM_LIST_LENGTH=12",
        "--train_batch_size=64", "--epochs=3", "--show_progress=False", "--learning_rate=0.003",
        "--hidden_dropout_prob=0.0", "--attn_dropout_prob=0.0", "--lora_dropout=0.0", "--dist_backend=gloo",
        f"--checkpoint_dir={folder / 'saved'}", "--ip=127.0.0.1", f"--port={free_port()}", *launch_options,
    ]
    run = subprocess.run(command, capture_output=True, text=True, cwd=folder, timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    # RecBole logs an OrderedDict, or a dict after gathering the ranks' results
    best = re.search(r"best valid : (?:OrderedDict\((\[.*?\])\)|(\{.*?\}))", log)
    test = re.search(r"test result: (?:OrderedDict\((\[.*?\])\)|(\{.*?\}))", log)
    assert best and test, log[-4000:]
    return log, *(dict(ast.literal_eval(found.group(1) or found.group(2))) for found in (best, test))


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch built without gloo")
def test_two_cpu_ranks_train_bertlora_like_one_process_with_the_same_global_batch(data_root, tmp_path):
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    log, valid, test = launch(data_root, tmp_path / "two", "--nproc=2")
    # every rank ended with the same adapter weights (checked across ranks by the trainer) ...
    assert re.search(r"DDP: trained weights identical on all 2 ranks", log), log[-3000:]
    # ... only rank 0 wrote checkpoints: one best model and one latest, both whole and loadable
    files = sorted((p.name for p in (tmp_path / "two" / "saved").iterdir()), key=lambda name: "-latest" in name)
    assert len(files) == 2 and files[1] == files[0].replace(".pth", "-latest.pth"), files
    best = load_checkpoint(tmp_path / "two" / "saved" / files[0])
    assert best["config"]["world_size"] == 2
    # ... which loads, data and model, in this one process (no process group): RecBole's own path
    from recbole.quick_start import load_data_and_model

    config, model, _, _, _, test_data = load_data_and_model(str(tmp_path / "two" / "saved" / files[0]))
    assert type(model).__name__ == "BERTLoRA" and len(test_data) > 0
    # ... and only rank 0 logged results
    assert log.count("test result") == 1

    # the reference: one process, the same global batch (RecBole gives each of N ranks 1/N of it) and the
    # same sample order (RecBole's DistributedSampler, here over one rank)
    _, valid_one, test_one = launch(data_root, tmp_path / "one", "--nproc=1", "--world_size=1")
    for metric in ("ndcg@10", "recall@10"):
        assert abs(valid[metric] - valid_one[metric]) <= TOLERANCE, (metric, valid, valid_one)
        assert abs(test[metric] - test_one[metric]) <= TOLERANCE, (metric, test, test_one)
    # and the two ranks learned: the training loss falls epoch by epoch
    losses = [float(x) for x in re.findall(r"train loss: ([\d.]+)", log)]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2], losses
