"""The recbole-llm command: RecBole's --key=value conventions, one-line errors, non-zero exits."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

from conftest import best_checkpoint
from helpers import Payload, assert_one_line_error, cli, slice_args
from recbole_llm import RecboleLLMError, load_checkpoint


@pytest.mark.slow
def test_run_trains_and_prints_best_valid_and_test(data_root, tmp_path):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(
        "pretrained_model_name_or_path: ~\nn_layers: 1\nhidden_size: 32\ninner_size: 64\n"
        "MAX_ITEM_LIST_LENGTH: 10\n"
    )
    result = cli(
        "run", "--model=BERTRec", "--dataset=ml-slice", f"--config_files={config_file}",
        *slice_args(data_root), "--epochs=1", f"--checkpoint_dir={tmp_path / 'saved'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "best valid" in log and "test result" in log
    # the config file and the command line both reached RecBole's Config
    assert "hidden_size = 32" in log and "epochs = 1" in log
    # a clean log: none of the stack's deprecation noise
    for noise in ("pkg_resources", "FutureWarning", "GradScaler", "Anomaly Detection", "np.bool8"):
        assert noise not in log, noise

    checkpoint = str(best_checkpoint(tmp_path / "saved", "BERTRec-*.pth"))
    evaluated = cli("evaluate", f"--checkpoint={checkpoint}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "test result" in evaluated.stdout + evaluated.stderr
    # a checkpoint re-scored with other metrics, the plugin's tail ones (they need the training split's item
    # counts) and seen items masked
    evaluated = cli("evaluate", f"--checkpoint={checkpoint}", "--metrics=['NDCG','TailNDCG']", "--repeatable=False")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    log = evaluated.stdout + evaluated.stderr
    assert "tailndcg@10" in log and "repeatable = False" in log


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, fragments",
    [
        (["run", "--model=NoSuchModel"], ["unknown model 'NoSuchModel'", "Available models: BERTRec"]),
        (["run", "--model=BERTRec", "--config_files=missing.yaml"], ["config file 'missing.yaml' does not exist"]),
        (["run", "--model=BERTRec", "epochs=1"], ["cannot read 'epochs=1'", "--key=value"]),
        (["fit"], ["unknown command 'fit'"]),
    ],
)
def test_bad_command_lines(args, fragments):
    assert_one_line_error(cli(*args), *fragments)


@pytest.mark.slow
def test_dataset_not_on_disk_names_where_it_looked(tmp_path):
    result = cli("run", "--model=BERTRec", "--dataset=ml-1m", f"--data_path={tmp_path}", "--show_progress=False")
    assert_one_line_error(result, "dataset 'ml-1m' not found", str(tmp_path / "ml-1m"), "data_path", "allow_download")
    result = cli("run", "--model=BERTRec", "--dataset=no-such-data", f"--data_path={tmp_path}")
    assert_one_line_error(result, "dataset 'no-such-data' not found", "data_path")


@pytest.mark.slow
def test_encoder_that_is_neither_a_folder_nor_reachable(data_root):
    result = cli(
        "run", "--model=BERTRec", "--dataset=ml-slice", *slice_args(data_root),
        "--pretrained_model_name_or_path=/no/such/encoder",
    )
    assert_one_line_error(result, "pretrained_model_name_or_path '/no/such/encoder'", "null")


@pytest.mark.slow
def test_encoder_limits(data_root):
    result = cli("run", "--dataset=ml-slice", *slice_args(data_root), "--backbone_layers=9")
    assert_one_line_error(result, "backbone_layers=9", "has 6 layers")
    result = cli("run", "--dataset=ml-slice", *slice_args(data_root), "--MAX_ITEM_LIST_LENGTH=1000")
    assert_one_line_error(result, "MAX_ITEM_LIST_LENGTH=1000 exceeds the 512 positions")


@pytest.mark.slow
def test_checkpoint_that_is_not_a_recbole_checkpoint(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a checkpoint")
    assert_one_line_error(cli("evaluate", f"--checkpoint={junk}"), "is not a RecBole checkpoint")
    weights_only = tmp_path / "weights.pth"
    torch.save({"weight": torch.zeros(2)}, weights_only)
    assert_one_line_error(cli("evaluate", f"--checkpoint={weights_only}"), "lacks ['config', 'state_dict']")
    assert_one_line_error(cli("evaluate", f"--checkpoint={tmp_path / 'none.pth'}"), "does not exist")


@pytest.mark.slow
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_checkpoint_is_refused_without_running_its_payload(tmp_path, protocol):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"config": Payload(marker), "state_dict": {}}, evil, pickle_protocol=protocol)
    with pytest.raises(RecboleLLMError, match="refusing to load .*'posix.system'"):
        load_checkpoint(evil)
    from recbole.quick_start import load_data_and_model

    with pytest.raises(RecboleLLMError, match="refusing to load"):
        load_data_and_model(str(evil))
    assert_one_line_error(cli("evaluate", f"--checkpoint={evil}"), "refusing to load")
    assert not marker.exists()

    raw = tmp_path / "raw.pkl"  # a plain pickle, not even a torch file
    raw.write_bytes(pickle.dumps(Payload(marker), protocol=protocol))
    with pytest.raises(RecboleLLMError):
        load_checkpoint(raw)
    assert not marker.exists()


LIGHT_COMMAND_LINE = """
import sys
from recbole_llm.cli import main
for args in ({cases}):
    try:
        main(list(args))
    except SystemExit:
        pass
print(sorted(m for m in ("torch", "recbole", "sklearn", "ray", "transformers", "onnx") if m in sys.modules))
"""


def test_help_and_argument_errors_import_nothing_heavy():
    """--help, every subcommand's --help and argument errors answer before torch, RecBole or ONNX load."""
    cases = [["--help"], ["nosuch"], ["export"], ["serve"], ["run", "--epochs"], ["evaluate"],
             *([name, "--help"] for name in ("run", "evaluate", "export", "serve", "models"))]
    run = subprocess.run([sys.executable, "-c", LIGHT_COMMAND_LINE.format(cases=repr(cases))],
                         capture_output=True, text=True, timeout=120)
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout[-2000:] + run.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C


def _interrupt(args: list[str], ready, timeout: float = 240) -> subprocess.CompletedProcess:
    """Start ``recbole-llm ARGS``, send SIGINT (what Ctrl-C sends) once ``ready(output so far)`` holds."""
    import signal
    import tempfile
    import time

    # append mode: the child shares each file's offset, and the polls below seek to 0 to read (without O_APPEND a
    # line the child wrote meanwhile would land at 0, over the start of the capture)
    with tempfile.TemporaryFile("a+") as out, tempfile.TemporaryFile("a+") as err:
        # SIGINT's default disposition, as at a terminal: a shell that starts the tests in the background (nohup
        # ... &) leaves SIGINT ignored, children inherit that, and Python then never raises KeyboardInterrupt
        process = subprocess.Popen([sys.executable, "-m", "recbole_llm", *args], stdout=out, stderr=err,
                                   stdin=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            out.seek(0)
            err.seek(0)
            if ready(out.read() + err.read()):
                break
            time.sleep(0.05)
        assert process.poll() is None, "finished before it could be interrupted"
        # RecBole's set_color (recbole/utils/logger.py:49) runs a bare `except:` on every log line, which swallows a
        # KeyboardInterrupt that lands inside it; as a user would, press Ctrl-C again if the first went unheard
        for _ in range(3):
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        process.wait(timeout=120)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, process.returncode, out.read(), err.read())


def assert_interrupted(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("recbole-llm:")]
    assert len(lines) == 1 and lines[0].startswith("recbole-llm: interrupted; ") and fragment in lines[0], lines


ENTRY = """
import multiprocessing, sys, time
from pathlib import Path
import recbole_llm.cli as cli

def leave_slowly(path):
    time.sleep(1.0)
    Path(path).write_text("left")

def interrupted():  # stands in for a command that Ctrl-C ended
    if sys.argv[1] == "during-the-line":
        raise KeyboardInterrupt  # a second Ctrl-C while the first one's line was printed
    multiprocessing.Process(target=leave_slowly, args=(sys.argv[2],)).start()  # a rank of run --nproc N
    return cli.INTERRUPTED_STATUS

if __name__ == "__main__":
    cli.main = interrupted
    cli.entry()
"""


def test_the_command_leaves_with_130_after_ctrl_c_once_its_ranks_have_left(tmp_path):
    """entry(): a Ctrl-C during the interruption's own line is the same interruption (130, no traceback), and the
    process leaves only after `run --nproc N`'s ranks have (they got the terminal's Ctrl-C too)."""
    script = tmp_path / "entry.py"
    script.write_text(ENTRY)
    for case in ("during-the-line", "a-rank-leaving"):
        run = subprocess.run([sys.executable, str(script), case, str(tmp_path / f"{case}.txt")], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 130 and "Traceback" not in run.stderr, (case, run.returncode, run.stderr[-2000:])
    assert (tmp_path / "a-rank-leaving.txt").read_text() == "left"  # joined, not left running behind the prompt


@pytest.mark.slow
def test_ctrl_c_during_run_export_and_evaluate_is_one_line(data_root, tmp_path):
    common = ["--model=BERTRec", "--dataset=ml-tiny", *slice_args(data_root), "--pretrained_model_name_or_path=None",
              "--n_layers=1", "--hidden_size=32", "--inner_size=64", "--MAX_ITEM_LIST_LENGTH=10",
              f"--checkpoint_dir={tmp_path / 'saved'}"]
    # training: interrupted after its first epoch's checkpoint is written
    result = _interrupt(["run", *common, "--epochs=500", "--stopping_step=500"], lambda log: "Saving current" in log)
    assert_interrupted(result, "checkpoints saved before it stay in checkpoint_dir")
    checkpoint = best_checkpoint(tmp_path / "saved", "BERTRec-*.pth")
    assert [p.name for p in (tmp_path / "saved").iterdir() if p.name.endswith(".partial")] == []

    # export: interrupted while its staging folder exists; nothing is left beside the output
    staging = lambda _: any(p.name.startswith(".art.partial-") for p in tmp_path.iterdir())  # noqa: E731
    result = _interrupt(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "art")], staging)
    assert_interrupted(result, "no artifact was written")
    assert not (tmp_path / "art").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # evaluate: interrupted a second after it started, while it loads torch, RecBole and the data (a signal
    # before Python installs its handler would kill it like any program)
    import time

    started = time.monotonic()
    result = _interrupt(["evaluate", f"--checkpoint={checkpoint}"], lambda _: time.monotonic() - started > 1.0)
    assert_interrupted(result, "nothing was written")
