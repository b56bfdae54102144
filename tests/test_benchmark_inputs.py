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

COMMITTED = sorted((BENCHMARKS / "results" / "runs").glob("quality_*/*.json"))  # quality.py's run records
NEW_ITEMS_RECORDS = sorted((BENCHMARKS / "results" / "runs" / "new_items").glob("*.json"))


def test_every_committed_record_reads(quality):
    assert COMMITTED
    for path in COMMITTED:
        record = json.loads(path.read_text())
        assert quality.read_record(path, record["model"], record["dataset"]) == record


def test_every_committed_new_items_record_reads(quality):
    new_items = load(BENCHMARKS / "new_items.py", "new_items")
    assert NEW_ITEMS_RECORDS
    for path in NEW_ITEMS_RECORDS:
        record = json.loads(path.read_text())
        assert new_items.read_record(path, record["dataset"], record["setting"], record["draw"]) == record


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


def test_a_child_that_the_plugin_refuses_is_reported_by_its_line(common, tmp_path):
    """A child stopped by the plugin's one-line error (a DataError's traceback in its log): that line."""
    script = child_script(tmp_path, "from recbole_llm.errors import DataError\n"
                                    "raise DataError('the file has no header: add one')\n")
    out = tmp_path / "result.json"
    with pytest.raises(SystemExit) as error:
        common.run_child(script, [str(out)], out, tmp_path / "child.log")
    one_line(error.value, f"{script.name}: error: the file has no header: add one (log ")


@pytest.mark.parametrize("argv, fragment", [
    (["--profile", "full", "--data-path", "EMPTY"], "has no ml-1m folder; give the folder that holds ml-1m/"),
    (["--profile", "sparse", "--data-path", "EMPTY"], "has no ml-1m folder"),  # the source of the cut dataset
    (["--models", "Pop,Pop"], "--models 'Pop,Pop' names Pop twice"),
    (["--seeds", "1,x"], "--seeds"),
    (["--profile", "quick", "--finished-only"], "--finished-only reports finished unbudgeted runs"),
    (["--profile", "converged", "--budget", "100", "--finished-only"], "trains nothing: drop --budget"),
])
def test_quality_arguments_are_checked_before_any_run_or_folder(quality, tmp_path, monkeypatch, argv, fragment):
    """Every argument checked before the first run starts (a missing ml-1m used to surface after every
    ml-100k run of the full profile) and before the scratch folder is made."""
    monkeypatch.setattr(quality, "SCRATCH", tmp_path / "scratch")
    monkeypatch.setattr(quality, "run_child", lambda *args, **kwargs: pytest.fail("a run started"))
    (tmp_path / "empty").mkdir()
    argv = [str(tmp_path / "empty") if arg == "EMPTY" else arg for arg in argv]
    monkeypatch.setattr(sys, "argv", ["quality.py", *argv])
    with pytest.raises(SystemExit) as error:
        quality.main()
    one_line(error.value, fragment)
    assert not (tmp_path / "scratch").exists()


def test_finished_only_reports_the_finished_runs_lists_the_rest_and_trains_nothing(quality, tmp_path, monkeypatch):
    """--finished-only (a profile that takes sessions, reported as far as it has got): the committed record is
    the report's row, the run without one is named as still to come, and no run starts."""
    monkeypatch.setattr(quality, "SCRATCH", tmp_path / "scratch")
    monkeypatch.setattr(quality, "run_child", lambda *args, **kwargs: pytest.fail("a run started"))
    monkeypatch.setattr(quality, "require_plotting", lambda script: None)  # tested below; [bench] is not in CI
    written = {}
    monkeypatch.setattr(quality, "write_results", lambda name, report, lines, folder, figure=None: written.update(
        report=report, lines=lines, folder=folder))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--profile", "converged", "--models",
                                      "BERT4Rec,BERTRec-all-drop3-L200", "--seeds", "2020,2021", "--finished-only"])
    state = tmp_path / "scratch" / "quality_converged" / "ml-100k_BERTRec-all-drop3-L200_seed2021.resume"
    state.mkdir(parents=True)  # that run, cut short here after 3 epochs
    (state / "progress.json").write_text(json.dumps({"epoch_wall": [1.0] * 3, "epoch_cpu": [1.0] * 3,
                                                     "valid_scores": [0.05, 0.07, 0.06], "resumed_at": []}))
    quality.main()
    report = written["report"]
    # its seed 2020 is committed, 2021 is not
    assert report["to_come"] == ["BERTRec-all-drop3-L200 seed 2021 (in progress here: 3 epochs, best validation "
                                 "NDCG@10 0.0700)"]
    assert list(report["results"]["ml-100k"]) == ["BERT4Rec", "BERTRec-all-drop3-L200"]
    committed = [json.loads((BENCHMARKS / "results" / "runs" / "quality_converged" /
                             f"ml-100k_BERT4Rec_seed{seed}.json").read_text())["test"]["ndcg@10"] for seed in (2020, 2021)]
    assert report["results"]["ml-100k"]["BERT4Rec"]["test"]["ndcg@10"] == pytest.approx(sum(committed) / 2)
    text = "\n".join(written["lines"])
    assert "**Finished: 3 of 4 runs** (1 to come)" in text and "still to come: BERTRec-all-drop3-L200 seed 2021 (" in text
    assert "| BERT4Rec |" in text and "| BERTRec-all-drop3-L200 (1 of 2 seeds) |" in text
    assert written["folder"] == tmp_path / "scratch" / "quality_converged"  # a subset: not results/
    # its progress is kept beside the records: a checkout without the run reports the same
    snapshot = BENCHMARKS / "results" / "runs" / "quality_converged" / "progress" / f"{state.stem}.json"
    try:
        assert json.loads(snapshot.read_text())["valid_scores"] == [0.05, 0.07, 0.06]
        shutil.rmtree(state)
        quality.main()
        assert written["report"]["to_come"] == report["to_come"]
    finally:
        shutil.rmtree(snapshot.parent)


def test_finished_only_without_any_finished_run_is_one_line(quality, tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "SCRATCH", tmp_path / "scratch")
    monkeypatch.setattr(quality, "run_child", lambda *args, **kwargs: pytest.fail("a run started"))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--profile", "converged", "--models", "BERTRec-all-4L-id-L200",
                                      "--seeds", "2020", "--finished-only"])
    with pytest.raises(SystemExit) as error:
        quality.main()
    one_line(error.value, "none of the runs asked for has a finished record", "drop --finished-only to train them")


@pytest.mark.parametrize("change, fragment", [
    (lambda r: r.update(budget_spent="x"), "budget_spent is not a number of CPU-seconds"),
    (lambda r: r.update(batches_trained=-5), "batches_trained is not a positive whole number"),
    (lambda r: r.update(batches_trained=0), "batches_trained is not a positive whole number"),
    (lambda r: r.pop("batches_per_epoch"), "batches_per_epoch is not a positive whole number"),
    (lambda r: r.pop("model"), "model is not a name"),
    (lambda r: r.update(epochs="x"), "epochs is \"x\""),  # and the checks of every run record
])
def test_a_damaged_epoch_cost_record_stops_the_ml1m_report_before_any_run(quality, tmp_path, monkeypatch, change,
                                                                           fragment):
    """The ml-1m report divides these records' fields: checked when the command starts, not after hours of runs."""
    committed = sorted((BENCHMARKS / "results" / "runs" / "quality_ml1m_epoch_cost").glob("*.json"))
    assert committed and all(quality.read_epoch_costs(committed[0].parent))
    record = json.loads(committed[0].read_text())
    change(record)
    (tmp_path / "costs").mkdir()
    (tmp_path / "costs" / committed[0].name).write_text(json.dumps(record))
    monkeypatch.setattr(quality, "EPOCH_COST_RECORDS", tmp_path / "costs")
    monkeypatch.setattr(quality, "SCRATCH", tmp_path / "scratch")
    monkeypatch.setattr(quality, "run_child", lambda *args, **kwargs: pytest.fail("a run started"))
    data = tmp_path / "data" / "ml-1m"
    data.mkdir(parents=True)
    monkeypatch.setattr(sys, "argv", ["quality.py", "--profile", "ml-1m", "--data-path", str(data.parent),
                                      "--models", "Pop", "--seeds", "2020"])
    with pytest.raises(SystemExit) as error:
        quality.main()
    one_line(error.value, f"epoch-cost record {tmp_path / 'costs' / committed[0].name} is damaged (",
             fragment, "git checkout --")


def test_a_missing_plotting_library_stops_before_any_run(quality, tmp_path, monkeypatch):
    """Hours of runs must not end in an ImportError where the report draws its figure."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what find_spec reports for a missing package
    monkeypatch.setattr(quality, "SCRATCH", tmp_path / "scratch")
    monkeypatch.setattr(quality, "run_child", lambda *args, **kwargs: pytest.fail("a run started"))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--profile", "converged", "--models", "BERTRec-all-4L-id-L200",
                                      "--seeds", "2020"])
    with pytest.raises(SystemExit) as error:
        quality.main()
    one_line(error.value, "matplotlib", 'pip install -e ".[bench]"')


HEADER = "user_id:token\titem_id:token\ttimestamp:float\n"


@pytest.mark.parametrize("content, fragment", [
    (b"", "no RecBole header"),
    (HEADER.encode() + b"1\t2\t3\nbroken\n", "line 3 lacks the 3 tab-separated fields"),
    (HEADER.encode() + b"1\t\xff\t3\n", "can't decode byte 0xff"),
    (HEADER.encode() + b"".join(b"%d\t%d\t%d\n" % (u, i, i) for u in range(3) for i in range(4)),
     "has 3 users with a training history, fewer than the batch of 1024"),
    (HEADER.encode() + b"".join(b"%d\t1\t1\n%d\t2\t2\n" % (u, u) for u in range(2000)),  # 2 items: no history
     "has 0 users with a training history"),
])
def test_eval_grouping_refuses_a_damaged_ml1m_in_one_line(tmp_path, content, fragment):
    eval_grouping = load(BENCHMARKS / "eval_grouping.py", "eval_grouping")
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "ml-1m.inter").write_bytes(content)
    with pytest.raises(SystemExit) as error:
        eval_grouping.ml1m_lengths(tmp_path, 200)
    one_line(error.value, fragment)


def test_run_child_reads_with_the_reader_given(common, tmp_path):
    out = tmp_path / "result.json"
    script = child_script(tmp_path, "out.write_text('{\"x\": 1}')\n")
    assert common.run_child(script, [str(out)], out, tmp_path / "child.log") == {"x": 1}
    assert common.run_child(script, [str(out)], out, tmp_path / "child.log", read=lambda p: {"read": p.name}) == \
        {"read": "result.json"}


# ---------------------------------------------------------------------------------------------------------
# the device kit: its arguments, manifests and parts, in a copy of its folder (parts of a few bytes)

@pytest.fixture(scope="module")
def kit_module():
    return load(KIT_SCRIPT, "kit_under_test")


def make_tree(root: Path) -> Path:
    """A copy of the kit as the device sees it (repo/benchmarks/gpu/kit.py), MovieLens-1M beside it
    (shared/datasets/ml-1m, a few rows); its staging folder will be kit/."""
    script = root / "repo" / "benchmarks" / "gpu" / "kit.py"
    script.parent.mkdir(parents=True)
    shutil.copy2(KIT_SCRIPT, script)
    data = root / "shared" / "datasets" / "ml-1m"
    data.mkdir(parents=True)
    (data / "ml-1m.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n")
    (data / "ml-1m.item").write_text("item_id:token\tmovie_title:token_seq\n2\tA film\n")
    return root


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path)


@pytest.fixture(scope="module")
def prepared_template(tmp_path_factory, kit_module):
    """A tree whose kit is prepared from fake wheels (one part), made once and copied by each test."""
    root = make_tree(tmp_path_factory.mktemp("prepared"))
    fake_wheels(root / "repo" / "my-wheels", kit_module)
    result = kit(root, "prepare", "--wheels", "my-wheels")
    assert result.returncode == 0, result.stderr
    assert "to benchmarks/gpu/payload" in result.stdout  # named as the user knows it
    return root


@pytest.fixture
def ready(tmp_path, prepared_template):
    """(the tree, its part-01 folder): a prepared kit of its own."""
    shutil.copytree(prepared_template, tmp_path / "tree", symlinks=True)
    return tmp_path / "tree", tmp_path / "tree" / "repo" / "benchmarks" / "gpu" / "payload" / "part-01"


def kit(tree: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "RECBOLE_LLM_KIT": str(tree / "kit")}
    return subprocess.run([sys.executable, "benchmarks/gpu/kit.py", *args], capture_output=True, text=True,
                          env=env, cwd=tree / "repo", timeout=timeout)


def refused(result: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def fake_wheels(folder: Path, kit_module, skip: str = "", python: str = "py3", abi: str = "none") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for pin in kit_module.WHEELS:
        name, version = pin.split("==")
        tags = (python, abi) if name == "onnxruntime-gpu" else ("py3", "none")
        if name != skip:
            with zipfile.ZipFile(folder / f"{kit_module.normalized(name)}-{version}-{tags[0]}-{tags[1]}-any.whl",
                                 "w") as wheel:
                wheel.writestr("x.txt", name)
    return folder


def prepared(tree: Path, kit_module) -> Path:
    """Prepare the kit from fake wheels; the one part's folder."""
    fake_wheels(tree / "repo" / "my-wheels", kit_module)
    result = kit(tree, "prepare", "--wheels", "my-wheels")
    assert result.returncode == 0, result.stderr
    assert "to benchmarks/gpu/payload" in result.stdout  # named as the user knows it
    return tree / "repo" / "benchmarks" / "gpu" / "payload" / "part-01"


def test_prepare_names_the_wheels_folder_given_never_its_staging_folder(tree, kit_module):
    message = refused(kit(tree, "prepare", "--wheels", "my-wheels"), "--wheels my-wheels: no such folder")
    fake_wheels(tree / "repo" / "my-wheels", kit_module, skip="recbole")
    message += refused(kit(tree, "prepare", "--wheels", "my-wheels"), "--wheels my-wheels lacks",
                       "1 of the 18 pins (recbole==1.2.1)")
    shutil.rmtree(tree / "repo" / "my-wheels")
    fake_wheels(tree / "repo" / "my-wheels", kit_module, python="cp311", abi="cp311")  # another Python's
    message += refused(kit(tree, "prepare", "--wheels", "my-wheels"), "(onnxruntime-gpu==1.31.1)")
    assert "/tmp" not in message and "kit-" not in message
    gpu = tree / "repo" / "benchmarks" / "gpu"
    assert sorted(p.name for p in gpu.iterdir()) == ["kit.py"]  # no payload, no payload.partial


def test_prepare_without_the_dataset_names_where_it_looked(tree, kit_module):
    shutil.rmtree(tree / "shared")
    fake_wheels(tree / "repo" / "my-wheels", kit_module)
    refused(kit(tree, "prepare", "--wheels", "my-wheels"), "MovieLens-1M not found at", "ml-1m.inter")


def test_a_prepared_kit_stages_and_checks(ready):
    tree, part = ready
    result = kit(tree, "stage")
    assert result.returncode == 0 and "on this machine: 1 of 1 parts" in result.stdout, result.stderr
    assert (tree / "kit" / "part-01").read_bytes() == (part / "data").read_bytes()
    assert sorted(p.name for p in (tree / "kit").iterdir()) == ["manifest.json", "part-01"]


def lie(part: Path, change) -> None:
    manifest = json.loads((part / "manifest.json").read_text())
    change(manifest)
    (part / "manifest.json").write_text(json.dumps(manifest))


def shrink(manifest: dict) -> None:  # a size that lies, the total kept consistent with it
    manifest["parts"][0]["bytes"] -= 1
    manifest["bundle_bytes"] -= 1


MANIFEST_DAMAGE = {  # name -> (what is done to the carried part, a fragment of the refusal)
    "truncated": (lambda p: (p / "manifest.json").write_text((p / "manifest.json").read_text()[:50]),
                  "manifest.json is not a kit manifest (unreadable: JSONDecodeError)"),
    "not-utf8": (lambda p: (p / "manifest.json").write_bytes(b"\xff\xfe{}"), "unreadable: UnicodeDecodeError"),
    "a-list": (lambda p: (p / "manifest.json").write_text("[]"), "(a JSON list, not an object)"),
    "missing": (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing or not a regular file"),
    "a-folder": (lambda p: ((p / "manifest.json").unlink(), (p / "manifest.json").mkdir()),
                 "manifest.json is missing or not a regular file"),
    "no-parts": (lambda p: lie(p, lambda m: m.pop("parts")), "(missing parts)"),
    "parts-a-string": (lambda p: lie(p, lambda m: m.update(parts="part-01")), "parts is not a list"),
    "part-named-outside": (lambda p: lie(p, lambda m: m["parts"][0].update(name="../../escape")),
                           "part 1 is not named part-01"),
    "bytes-a-string": (lambda p: lie(p, lambda m: m["parts"][0].update(bytes="12")), "part-01's bytes"),
    "bytes-too-many": (lambda p: lie(p, lambda m: m["parts"][0].update(bytes=2**40)), "part-01's bytes"),
    "sha-not-hex": (lambda p: lie(p, lambda m: m["parts"][0].update(sha256="x" * 64)), "not a SHA-256"),
    "total-lies": (lambda p: lie(p, lambda m: m.update(bundle_bytes=m["bundle_bytes"] + 1)), "do not add up"),
    "python-a-number": (lambda p: lie(p, lambda m: m.update(python=3.12)), "python is not a version"),
    "wheels-a-path": (lambda p: lie(p, lambda m: m["wheels"].append("../x.whl")), "wheels is not a list"),
    "size-lies": (lambda p: lie(p, shrink), "part-01 arrived but is corrupt (", "its manifest says"),
    "checksum-lies": (lambda p: lie(p, lambda m: m["parts"][0].update(sha256="0" * 64)),
                      "part-01 arrived but is corrupt (checksum differs)"),
    "data-truncated": (lambda p: (p / "data").write_bytes((p / "data").read_bytes()[:-10]),
                       "part-01 arrived but is corrupt ("),
    "data-missing": (lambda p: (p / "data").unlink(), "part-01 arrived but has no data"),
    "data-a-folder": (lambda p: ((p / "data").unlink(), (p / "data").mkdir()), "has no data"),
    "data-a-fifo": (lambda p: ((p / "data").unlink(), os.mkfifo(p / "data")), "has no data"),
    "data-dev-zero": (lambda p: ((p / "data").unlink(), (p / "data").symlink_to("/dev/zero")), "has no data"),
    "renamed": (lambda p: p.rename(p.with_name("part-02")), "part-02 is not a part of its manifest's kit"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_a_damaged_carried_part_is_refused_in_one_line_and_nothing_staged(ready, case):
    tree, part = ready
    damage, *fragments = MANIFEST_DAMAGE[case]
    damage(part)
    message = refused(kit(tree, "stage", timeout=20), *fragments)
    assert str(tree) not in message  # the carried folder as the user names it: benchmarks/gpu/payload/...
    assert not (tree / "kit" / "part-01").exists() and not (tree / "kit" / "part-02").exists()
    assert not list((tree / "kit").glob("*.partial")) if (tree / "kit").exists() else True


def test_staged_parts_are_checked_again_before_a_run(ready):
    tree, _ = ready
    assert kit(tree, "stage").returncode == 0
    staged = tree / "kit" / "part-01"
    original = staged.read_bytes()
    staged.write_bytes(original + b"x")
    refused(kit(tree, "run", "--minutes", "1"), "part-01 on this machine is corrupt (", "stage it again")
    staged.write_bytes(original)
    (tree / "kit" / "manifest.json").write_text("{")
    refused(kit(tree, "run", "--minutes", "1"), "is not a kit manifest", "stage every part again")
    (tree / "kit" / "manifest.json").unlink()
    staged.unlink()
    staged.mkdir()
    refused(kit(tree, "run", "--minutes", "1"), "no part staged on this machine")


def test_staging_another_kit_discards_the_old_one(tree, kit_module):
    part = prepared(tree, kit_module)
    assert kit(tree, "stage").returncode == 0
    (tree / "kit" / "site").mkdir()  # an install from the old kit, which install() would otherwise reuse
    (tree / "shared" / "datasets" / "ml-1m" / "ml-1m.item").write_text("item_id:token\n3\n")
    prepared(tree, kit_module)  # another kit: other data, another checksum
    result = kit(tree, "stage")
    assert result.returncode == 0 and "discarded what was staged in" in result.stdout
    assert not (tree / "kit" / "site").exists()
    assert (tree / "kit" / "part-01").read_bytes() == (part / "data").read_bytes()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "abc", "1e9", ""])
def test_run_minutes_must_be_a_sensible_budget(tree, value):
    refused(kit(tree, "run", "--minutes", value), "--minutes", "from 1 to 60")


def test_argument_errors_are_one_line(tree):
    refused(kit(tree), "the following arguments are required")
    refused(kit(tree, "stag"), "invalid choice: 'stag'")
    refused(kit(tree, "prepare", "--wheel-dir", "x"), "unrecognized arguments")


def test_check_refuses_a_payload_that_is_not_whole(tree, kit_module):
    refused(kit(tree, "check"), "no kit at benchmarks/gpu/payload", "prepare")
    part = prepared(tree, kit_module)
    shutil.copytree(part, part.with_name("part-02"))
    refused(kit(tree, "check"), "benchmarks/gpu/payload holds part-01, part-02, its manifest lists part-01")
    shutil.rmtree(part.with_name("part-02"))
    (part / "data").write_bytes(b"tampered")
    refused(kit(tree, "check"), "benchmarks/gpu/payload/part-01 is corrupt (8 bytes")
    shutil.rmtree(part)
    refused(kit(tree, "check"), "no parts in benchmarks/gpu/payload")


def test_a_staging_folder_that_cannot_be_written_is_one_line(ready):
    tree, _ = ready
    (tree / "kit").write_text("a file where the kit's folder should be")
    refused(kit(tree, "stage"), "run 'stage' again")


def test_install_refuses_parts_that_match_their_manifest_but_not_a_kit(kit_module, tmp_path, monkeypatch):
    """A manifest whose checksums are right for parts 'prepare' did not write: refused before pip runs."""
    monkeypatch.setattr(kit_module, "KIT", tmp_path)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for data, fragment in [(b"not a tar at all" * 100, "do not unpack"),
                           (empty_tar(), "do not hold the wheels and data their manifest lists")]:
        (tmp_path / "part-01").write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        (tmp_path / "manifest.json").write_text(json.dumps({
            "python": version, "wheels": ["recbole-1.2.1-py3-none-any.whl"], "bundle_sha256": digest,
            "bundle_bytes": len(data), "parts": [{"name": "part-01", "bytes": len(data), "sha256": digest}]}))
        with pytest.raises(kit_module.KitError, match=fragment):
            kit_module.install()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "part-01"]


def empty_tar() -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("datasets/readme.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    return buffer.getvalue()


def test_ctrl_c_is_one_line(quality, kit_module, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quality, "main", interrupted)
    assert quality.entry() == 130
    monkeypatch.setattr(kit_module, "check", interrupted)
    monkeypatch.setattr(sys, "argv", ["kit.py", "check"])
    assert kit_module.main() == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("quality.py: interrupted") and \
        lines[1].startswith("kit: interrupted"), lines


def test_prepared_parts_stage_and_unpack_into_an_install(ready, kit_module, monkeypatch):
    """prepare -> stage -> install end to end, pip aside (the wheels here are fakes): the bundle holds every
    wheel its manifest lists and the dataset, and the install is renamed into place only when whole."""
    tree, _ = ready
    assert kit(tree, "stage").returncode == 0
    staged = tree / "kit"
    manifest = json.loads((staged / "manifest.json").read_text())
    manifest["python"] = f"{sys.version_info.major}.{sys.version_info.minor}"  # not part of any checksum
    (staged / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(kit_module, "KIT", staged)
    installed = []

    def pip(command, **kwargs):
        target = Path(command[command.index("--target") + 1])
        installed.extend(Path(c).name for c in command if c.endswith(".whl"))
        target.mkdir()
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(kit_module.subprocess, "run", pip)
    assert kit_module.install() == staged / "site"
    assert sorted(installed) == sorted(manifest["wheels"]) and len(installed) == len(kit_module.WHEELS)
    assert (staged / "unpacked" / "datasets" / "ml-1m" / "ml-1m.item").is_file()
    assert not (staged / "site.partial").exists()
