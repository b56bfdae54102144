"""What every benchmark records with its figures: command, commit, package versions, machine; and how it
runs one job in a fresh process."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata, util
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRATCH = HERE / "scratch"
PACKAGES = ("torch", "recbole", "transformers", "peft", "onnx", "onnxruntime", "onnxruntime-gpu", "recbole_llm")


def provenance(command: list[str] | None = None) -> dict:
    """Date, command line, commit (with a dirty flag), machine and package versions of this run."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    # dirty: code or config differs from the commit (results/ are this script's own outputs, so a report
    # regenerated beside another does not mark it)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":(top,exclude)benchmarks/results"],
                           capture_output=True, text=True, cwd=HERE).stdout.strip()
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(command or sys.argv),
        "commit": (commit.stdout.strip() or "unknown") + ("-dirty" if dirty else ""),
        "machine": machine(),
        "versions": versions,
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    described = f"{cpu}, {len(os.sched_getaffinity(0))} cores, {platform.system()}"
    try:
        import torch

        if torch.cuda.is_available():
            described += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return described


def peak_rss_mb() -> int:
    """This process's peak resident memory in MB: /proc/self/status VmHWM, which starts afresh at exec.
    (getrusage's ru_maxrss keeps the parent's peak across fork and exec on Linux, so a child started right
    after its parent built a big table would report the parent's memory.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; SystemExit (one line naming the file and the fix) when it is not a regular
    file of UTF-8 JSON holding an object."""
    try:
        if not path.is_file():
            raise OSError("not a regular file")
        value = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(value, dict):
            raise ValueError(f"a JSON {type(value).__name__}, not an object")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise SystemExit(f"{Path(sys.argv[0]).name}: error: {path} is unreadable ({type(error).__name__}: "
                         f"{(str(error).splitlines() or [''])[0]}); delete it and run again") from None
    return value


def run_child(script: Path, args: list[str], result_file: Path, log_file: Path, python: str | None = None,
              read: Callable[[Path], dict] = read_json) -> dict:
    """Run ``python script args`` in a fresh process (this interpreter, or ``python``: another environment)
    that writes its result as JSON to ``result_file``, and return it as ``read`` reads it. An older
    ``result_file`` stays until the new one replaces it (it may be a committed record); one the child did not
    write counts as none. A child that stops on a one-line error (its log's last line ``<script>: error: ...``)
    is reported by that line; any other failure by the log's tail."""
    started = time.time()
    with open(log_file, "w") as log:
        code = subprocess.run([python or sys.executable, str(script), *args], stdout=log, stderr=subprocess.STDOUT,
                              cwd=log_file.parent).returncode
    if code != 0 or not result_file.exists() or result_file.stat().st_mtime < started - 1:
        text = log_file.read_text(encoding="utf-8", errors="replace")
        last = (text.strip().splitlines() or [""])[-1]
        if code != 0 and last.startswith(f"{script.name}: error: "):
            raise SystemExit(f"{last} (log {log_file})")
        if code != 0 and last.startswith("recbole_llm.errors."):  # the plugin's one-line refusal of an input
            raise SystemExit(f"{script.name}: error: {last.partition(': ')[2]} (log {log_file})")
        raise SystemExit(f"{script.name} {' '.join(args)} failed (exit {code}); log {log_file}:\n{text[-3000:]}")
    return read(result_file)


def write_results(name: str, report: dict, markdown: list[str], folder: Path = RESULTS,
                  figure: Callable[[Path], None] | None = None) -> None:
    """Write `folder`/`name`.json and .md (and .png, drawn by `figure(path)`) and print the markdown.
    Every file is written beside its target first and renamed over it only once all are written, so an
    error or an interrupt leaves the previous report whole, never a truncated or half-updated one."""
    folder.mkdir(parents=True, exist_ok=True)
    staged = {folder / f"{name}.json": json.dumps(report, indent=2) + "\n",
              folder / f"{name}.md": "\n".join(markdown) + "\n"}
    temporary = {path: path.with_name(f".{path.stem}.tmp{path.suffix}") for path in  # suffix kept: savefig reads it
                 [*staged, *([folder / f"{name}.png"] if figure else [])]}
    try:
        for path, text in staged.items():
            temporary[path].write_text(text)
        if figure:
            figure(temporary[folder / f"{name}.png"])
        for path, tmp in temporary.items():
            tmp.replace(path)
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
    print("\n".join(markdown))


def require_plotting(script: str) -> None:
    """SystemExit (one line naming the fix) when matplotlib, which draws the report's figure, is missing: called
    before a benchmark measures anything, so hours of runs do not end in an ImportError at the last step."""
    if util.find_spec("matplotlib") is None:
        raise SystemExit(f"{script}: error: matplotlib draws this report's figure and is not installed; "
                         'install the benchmarks\' extra first: pip install -e ".[bench]"')


def read_small_json(path: Path, max_bytes: int, what: str) -> tuple[object, str]:
    """``(parsed JSON, "")`` of a record file, or ``(None, problem)``: the type and size are checked first, since a
    folder, a FIFO or /dev/zero in its place would fail or hang on reading; ``what`` names it in the size message."""
    import stat

    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            return None, "a folder, not a file"
        if not stat.S_ISREG(info.st_mode):
            return None, "not a regular file"
        if info.st_size > max_bytes:
            return None, f"{info.st_size:,} bytes, too large for {what} (at most {max_bytes:,})"
        return json.loads(path.read_bytes().decode("utf-8")), ""
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        return None, f"unreadable ({type(error).__name__}: {(str(error).splitlines() or [''])[0]})"
