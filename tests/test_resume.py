"""Training killed mid-run resumes from its latest checkpoint to the same results; a killed save leaves the
previous checkpoint whole. Every run is a real ``recbole-llm run`` process; kills are SIGKILL."""

from __future__ import annotations

import ast
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recbole_llm.checkpoint.loading import load_checkpoint

EPOCHS = 4


def command(data_root: Path, checkpoint_dir: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    load_col = json.dumps({"inter": ["user_id", "item_id", "timestamp"]})
    return [
        sys.executable, "-m", "recbole_llm", "run", "--model=BERTLoRA", "--dataset=ml-tiny",
        f"--data_path={data_root}", f"--load_col={load_col}", "--pretrained_model_name_or_path=None",
        "--hidden_size=32", "--inner_size=64", "--n_layers=1", "--MAX_ITEM_LIST_LENGTH=12",
        "--train_batch_size=64", f"--epochs={epochs}", "--stopping_step=10", "--show_progress=False",
        "--learning_rate=0.003", f"--checkpoint_dir={checkpoint_dir}", *extra,
    ]


def results(log: str) -> tuple[dict, dict]:
    best = re.search(r"best valid : OrderedDict\((\[.*?\])\)", log)
    test = re.search(r"test result: OrderedDict\((\[.*?\])\)", log)
    assert best and test, log[-3000:]
    return dict(ast.literal_eval(best.group(1))), dict(ast.literal_eval(test.group(1)))


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory) -> tuple[dict, dict]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    run = subprocess.run(command(data_root, folder / "saved"), capture_output=True, text=True, cwd=folder,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return results(run.stdout + run.stderr)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_results(data_root, tmp_path, uninterrupted):
    saved = tmp_path / "saved"
    process = subprocess.Popen(command(data_root, saved), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=tmp_path)
    deadline = time.monotonic() + 600
    while not list(saved.glob("*-latest.pth")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # during the epoch after the first latest checkpoint
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    (latest,) = saved.glob("*-latest.pth")
    stopped_at = load_checkpoint(latest)["epoch"]
    assert stopped_at < EPOCHS - 1

    resumed = subprocess.run(command(data_root, saved, f"--resume_from={latest}"), capture_output=True, text=True,
                             cwd=tmp_path, timeout=600)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert f"Resume training from epoch {stopped_at + 1}" in log
    assert results(log) == uninterrupted
    # the resumed run kept writing the run's own files: its best model and its latest checkpoint
    assert load_checkpoint(latest)["epoch"] == EPOCHS - 1
    assert len(list(saved.glob("*.pth"))) == 2


KILL_DURING_SAVE = """
import os, signal, sys
import recbole_llm
from recbole_llm.checkpoint.loading import load_checkpoint
from recbole_llm.checkpoint.format import atomic_save

state = load_checkpoint(sys.argv[1])
state["epoch"] = 99
def die(fd):  # the bytes are written, not yet on disk for sure, when the process dies
    os.kill(os.getpid(), signal.SIGKILL)
os.fsync = die
atomic_save(state, sys.argv[1])
"""


@pytest.mark.slow
def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(data_root, tmp_path):
    saved = tmp_path / "saved"
    run = subprocess.run(command(data_root, saved, epochs=1), capture_output=True, text=True, cwd=tmp_path,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (latest,) = saved.glob("*-latest.pth")
    before = load_checkpoint(latest)

    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(latest)], capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # the interrupted write went to a temporary file of its own beside it
    assert len(list(latest.parent.glob(f".{latest.name}.*.partial"))) == 1
    after = load_checkpoint(latest)
    assert after["epoch"] == before["epoch"] == 0
    assert after["state_dict"].keys() == before["state_dict"].keys()
