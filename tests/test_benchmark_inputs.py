"""Damaged benchmark inputs end in one line naming the problem and the fix, never a traceback or a silent
reuse: quality.py's per-run records (benchmarks/results/runs/) and resume state, the children benchmarks
start (``_common.run_child``), and the device kit's arguments, manifests and parts (benchmarks/gpu/kit.py).

Nothing here trains: the records are copies of committed ones, edited, and the kit runs on parts of a few
bytes in a copy of its folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
KIT_SCRIPT = BENCHMARKS / "gpu" / "kit.py"


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quality():
    return load(BENCHMARKS / "quality.py", "quality_under_test")


@pytest.fixture(scope="module")
def common(quality):
    return sys.modules["_common"]  # quality.py put benchmarks/ on sys.path and imported it


def one_line(error: SystemExit, *fragments: str) -> str:
    message = str(error.code)
    assert "\n" not in message and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ---------------------------------------------------------------------------------------------------------
# quality.py's run records

COMMITTED = sorted((BENCHMARKS / "results" / "runs").glob("*/*.json"))


def test_every_committed_record_reads(quality):
    assert COMMITTED
    for path in COMMITTED:
        record = json.loads(path.read_text())
        assert quality.read_record(path, record["model"], record["dataset"]) == record


def good_record() -> dict:
    return json.loads(COMMITTED[0].read_text())


def edited(change):
    record = good_record()
    change(record)
    return json.dumps(record)


DAMAGED = {  # name -> (file content, a fragment of the one line)
    "truncated": (COMMITTED[0].read_text()[:200] if COMMITTED else "{", "unreadable (JSONDecodeError"),
    "empty": ("", "unreadable (JSONDecodeError"),
    "not-utf8": (b'{"config": "\xff\xfe"}', "unreadable (UnicodeDecodeError"),
    "a-list": ("[1, 2]", "not a JSON object (a list)"),
    "null": ("null", "not a JSON object"),
    "nested-deep": ("[" * 200_000 + "]" * 200_000, "unreadable (RecursionError"),
    "no-config": (edited(lambda r: r.pop("config")), "incomplete (missing config)"),
    "config-a-string": (edited(lambda r: r.update(config="SASRec")), "config is \"SASRec\", not an object"),
    "epochs-a-string": (edited(lambda r: r.update(epochs="12")), "epochs is \"12\", not a whole number"),
    "epochs-negative": (edited(lambda r: r.update(epochs=-3)), "epochs is -3"),
    "epochs-a-bool": (edited(lambda r: r.update(epochs=True)), "epochs is true"),
    "params-a-float": (edited(lambda r: r.update(trainable_params=1.5)), "trainable_params is 1.5"),
    "rss-null": (edited(lambda r: r.update(peak_rss_mb=None)), "peak_rss_mb is null"),
    "test-a-list": (edited(lambda r: r.update(test=[0.1])), "test is [0.1], not an object"),
    "test-lacks-tail": (edited(lambda r: r["test"].pop("tailndcg@10")), "missing test.tailndcg@10"),
    "ndcg-nan": (edited(lambda r: r["test"].update({"ndcg@10": float("nan")})), "test.ndcg@10 is NaN"),
    "ndcg-a-string": (edited(lambda r: r["test"].update({"ndcg@10": "0.07"})), "test.ndcg@10 is \"0.07\""),
    "ndcg-above-one": (edited(lambda r: r["test"].update({"ndcg@10": 7.0})), "not a score from 0 to 1"),
    "valid-scores-a-string": (edited(lambda r: r.update({"valid_ndcg@10": "0.1,0.2"})), "valid_ndcg@10 is"),
    "valid-scores-infinite": (edited(lambda r: r.update({"valid_ndcg@10": [0.1, float("inf")]})),
                              "valid_ndcg@10 is [0.1, Infinity]"),
    "machine-a-list": (edited(lambda r: r.update(machine=["x"])), "machine is [\"x\"], not a string"),
    "to95-a-string": (edited(lambda r: r.update(cpu_seconds_to_95="soon")), "cpu_seconds_to_95 is \"soon\""),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_record_stops_with_one_line(quality, tmp_path, case):
    content, fragment = DAMAGED[case]
    path = tmp_path / "ml-100k_SASRec_seed2020.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit) as error:
        quality.read_record(path, "SASRec", "ml-100k")
    one_line(error.value, str(path), fragment, "delete it to run that model again")


def test_a_record_that_is_a_folder_fifo_or_device_is_not_read(quality, tmp_path):
    folder = tmp_path / "folder.json"
    folder.mkdir()
    with pytest.raises(SystemExit) as error:
        quality.read_record(folder)
    one_line(error.value, "is a folder, not a file", f"rm -r {folder}")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # reading it would wait forever for a writer
    with pytest.raises(SystemExit) as error:
        quality.read_record(fifo)
    one_line(error.value, "not a regular file")
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")  # reading it would fill memory
    with pytest.raises(SystemExit) as error:
        quality.read_record(zero)
    one_line(error.value, "not a regular file")
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(quality.RECORD_MAX_BYTES + 1)
    with pytest.raises(SystemExit) as error:
        quality.read_record(huge)
    one_line(error.value, "too large for a run record")


def test_a_record_of_another_run_is_not_reused(quality, tmp_path):
    record = good_record()
    path = tmp_path / "ml-100k_GRU4Rec_seed2020.json"
    path.write_text(json.dumps({**record, "model": "SASRec"}))
    with pytest.raises(SystemExit) as error:
        quality.read_record(path, "GRU4Rec", "ml-100k")
    one_line(error.value, "another run's (model 'SASRec', its name says 'GRU4Rec')")
    path.write_text(json.dumps({**record, "dataset": "ml-1m"}))
    with pytest.raises(SystemExit) as error:
        quality.read_record(path, record["model"], "ml-100k")
    one_line(error.value, "another run's (dataset 'ml-1m'")


def test_a_damaged_committed_record_names_git_as_the_fix(quality, tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "RUN_RECORDS", tmp_path)
    path = tmp_path / "quality_converged" / "ml-100k_Pop_seed2020.json"
    path.parent.mkdir()
    path.write_text("{")
    with pytest.raises(SystemExit) as error:
        quality.read_record(path)
    one_line(error.value, f"restore it with `git checkout -- {path}`")


def test_the_report_refuses_a_damaged_record_before_running_anything(quality, tmp_path, monkeypatch, capsys):
    """quality.py --profile converged with one damaged record: one line, no run started, no report written."""
    monkeypatch.setattr(quality, "RUN_RECORDS", tmp_path / "runs")
    monkeypatch.setattr(quality, "SCRATCH", tmp_path / "scratch")
    monkeypatch.setattr(quality, "provenance", lambda: {"date": "-", "command": "-", "commit": "-", "machine": "-"})
    started = []
    monkeypatch.setattr(quality, "run_child", lambda *args, **kwargs: started.append(args))
    records = tmp_path / "runs" / "quality_converged"
    records.mkdir(parents=True)
    (records / "ml-100k_Pop_seed2020.json").write_text(edited(lambda r: r.update(epochs="many")))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--profile", "converged", "--models", "Pop", "--seeds", "2020"])
    with pytest.raises(SystemExit) as error:
        quality.main()
    one_line(error.value, "ml-100k_Pop_seed2020.json is damaged (epochs is \"many\"")
    assert not started
    assert not list((tmp_path / "scratch").glob("quality_converged/quality_*"))


def test_resume_state_damage_is_one_line(quality, tmp_path):
    progress = {"epoch_wall": [1.0, 2.0], "epoch_cpu": [1.0, 2.0], "valid_scores": [0.1, 0.2], "resumed_at": [1]}
    (tmp_path / "progress.json").write_text(json.dumps(progress))
    assert quality.read_progress(tmp_path) == progress
    for damaged, fragment in [("{", "is unreadable (JSONDecodeError)"), (b"\xff", "is unreadable (UnicodeDecodeError)"),
                              (json.dumps({"epoch_wall": []}), "lacks epoch_wall"),
                              (json.dumps({**progress, "valid_scores": ["x"]}), "not a finite number"),
                              (json.dumps({**progress, "epoch_cpu": [1.0]}), "different numbers of epochs")]:
        (tmp_path / "progress.json").write_bytes(damaged if isinstance(damaged, bytes) else damaged.encode())
        with pytest.raises(SystemExit) as error:
            quality.read_progress(tmp_path)
        one_line(error.value, fragment, f"delete {tmp_path} to start that run over")


# ---------------------------------------------------------------------------------------------------------
# _common.run_child: what a child wrote, and how it failed

def child_script(folder: Path, body: str) -> Path:
    script = folder / "child.py"
    script.write_text("import sys\nfrom pathlib import Path\nout = Path(sys.argv[1])\n" + body)
    return script


@pytest.mark.parametrize("body, fragment", [
    ("out.write_text('{\"a\": ')\n", "is unreadable (JSONDecodeError"),
    ("out.write_bytes(b'\\xff')\n", "is unreadable (UnicodeDecodeError"),
    ("out.write_text('[]')\n", "a JSON list, not an object"),
    ("out.mkdir()\n", "not a regular file"),
])
def test_a_child_result_that_is_not_a_json_object_is_one_line(common, tmp_path, body, fragment):
    out = tmp_path / "result.json"
    with pytest.raises(SystemExit) as error:
        common.run_child(child_script(tmp_path, body), [str(out)], out, tmp_path / "child.log")
    one_line(error.value, str(out), fragment)


def test_a_child_that_stops_on_one_line_is_reported_by_that_line(common, tmp_path):
    script = child_script(tmp_path, "print('some log')\nprint(b'\\xff'.decode('latin-1'))\n"
                                    "raise SystemExit('child.py: error: the thing is damaged; delete it')\n")
    out = tmp_path / "result.json"
    with pytest.raises(SystemExit) as error:
        common.run_child(script, [str(out)], out, tmp_path / "child.log")
    one_line(error.value, "child.py: error: the thing is damaged; delete it (log ")


def test_run_child_reads_with_the_reader_given(common, tmp_path):
    out = tmp_path / "result.json"
    script = child_script(tmp_path, "out.write_text('{\"x\": 1}')\n")
    assert common.run_child(script, [str(out)], out, tmp_path / "child.log") == {"x": 1}
    assert common.run_child(script, [str(out)], out, tmp_path / "child.log", read=lambda p: {"read": p.name}) == \
        {"read": "result.json"}
