"""The worst explained request the service accepts: its seconds and peak memory, within --max-explained.

    python benchmarks/explain_bound.py --build          # trains and exports the measured artifact (minutes)
    python benchmarks/explain_bound.py                  # writes benchmarks/results/explain_bound.{md,json}
    python benchmarks/explain_bound.py --artifact DIR --max-explained N

An explained request costs model rows (each history, and it once without each item the model reads:
``Recommender.explain_rows``) and effects in its answer (k x items read, per history:
``Recommender.explain_effects``); the service refuses one past ``--max-explained`` rows, or past
``EFFECTS_PER_ROW`` times as many effects, with 413. The worst requests within the limit are as many
full-window histories (max_length distinct items each) as the rows allow, at k=1 (the model's work alone)
and at the largest k the effects allow (the model's work and the biggest answer). Each request is sent to a
real ``recbole-llm serve`` (its own process, ONNX Runtime and numpy only): the table gives its latency over
HTTP (median of 3 after one warm-up, with min / max) and the service process's peak resident memory
(VmHWM) after it; the same request one history (or one k) over the limit must get 413.

``--build`` trains BERTLoRA on the default pretrained encoder (all-MiniLM-L6-v2, all 6 layers, 50 items of
history: the inference benchmark's model) for one epoch on 20 users of ml-100k (what an explanation costs
does not depend on how well the model was trained) and exports it to scratch/explain_bound/artifact.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, SCRATCH, provenance, write_results  # noqa: E402

WORK = SCRATCH / "explain_bound"
BUILD_USERS = 20


def build(folder: Path) -> Path:
    """BERTLoRA (MiniLM, 6 layers, L=50) trained one epoch on a few users of ml-100k, exported (fp32)."""
    import recbole
    from recbole.quick_start import run_recbole

    import recbole_llm  # noqa: F401 (registers the models)
    from recbole_llm.export import ExportOptions, export_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    source = Path(recbole.__file__).parent / "dataset_example" / "ml-100k"
    header, *rows = (source / "ml-100k.inter").read_text().splitlines()
    users = set(sorted({row.split("\t", 1)[0] for row in rows}, key=int)[:BUILD_USERS])
    data = folder / "data" / "ml-few"
    data.mkdir(parents=True, exist_ok=True)
    (data / "ml-few.inter").write_text("\n".join([header] + [r for r in rows if r.split("\t", 1)[0] in users]) + "\n")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        run_recbole(model="BERTLoRA", dataset="ml-few", config_dict={
            "data_path": str(folder / "data"), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "MAX_ITEM_LIST_LENGTH": 50, "epochs": 1, "train_batch_size": 256, "show_progress": False,
            "checkpoint_dir": str(folder / "saved"), "state": "warning"})
    finally:
        os.chdir(cwd)
    (checkpoint,) = [p for p in (folder / "saved").iterdir() if p.suffix == ".pth" and "-latest" not in p.name]
    return export_checkpoint(checkpoint, folder / "artifact", ExportOptions(force=True)).path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def post(port: int, payload: dict) -> tuple[int, dict, float]:
    body = json.dumps(payload).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/recommend", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            status, answer = response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        status, answer = error.code, json.loads(error.read())
    return status, answer, time.perf_counter() - start


def main() -> None:
    from recbole_llm.serving.requests import EFFECTS_PER_ROW, Limits

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, default=WORK / "artifact")
    parser.add_argument("--build", action="store_true", help="train and export the artifact first")
    parser.add_argument("--max-explained", type=int, default=Limits().max_explained)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    args = parser.parse_args()
    if args.build:
        args.artifact = build(WORK)
    metadata_path = args.artifact / "metadata.json"
    if not metadata_path.is_file():
        raise SystemExit(f"explain_bound.py: error: no artifact at {args.artifact}; run with --build first")
    metadata = json.loads(metadata_path.read_text())
    length, limit = metadata["max_length"], args.max_explained
    tokens = metadata["item_tokens"][1:]
    window = tokens[:length]  # max_length distinct known items: every history costs length + 1 rows

    def request(histories: int, k: int) -> dict:
        return {"histories": [window] * histories, "k": k, "explain": True, "exclude_seen": False}

    port = free_port()
    command = [sys.executable, "-m", "recbole_llm", "serve", str(args.artifact), "--port", str(port),
               "--max-explained", str(limit)] + (["--threads", str(args.threads)] if args.threads else [])
    service = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runs = []
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                break
            except OSError:
                if service.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"explain_bound.py: error: the service did not start: {service.stderr.read()}")
                time.sleep(0.5)
        post(port, {"histories": [window[:5]], "k": 3, "explain": True})  # warm-up
        loaded_mb = peak_mb(service.pid)
        histories = limit // (length + 1)
        largest_k = min(EFFECTS_PER_ROW * limit // (histories * length), len(tokens))
        for k, over in ((1, request(histories + 1, 1)), (largest_k, request(histories, largest_k + 1))):
            payload = request(histories, k)
            times = []
            for _ in range(4):
                status, answer, took = post(port, payload)
                assert status == 200, answer
                times.append(took)
            over_status, refused, _ = post(port, over)
            assert over_status == 413, refused
            runs.append({"k": k, "histories": histories, "history_length": length,
                         "model_rows": histories * (length + 1), "effects": histories * length * k,
                         "p50_s": statistics.median(times[1:]), "min_s": min(times[1:]), "max_s": max(times[1:]),
                         "service_peak_mb": peak_mb(service.pid), "over_limit": refused["error"]})
    finally:
        service.terminate()
        service.wait(timeout=60)
    report = {**provenance(), "artifact": str(args.artifact), "max_explained": limit, "max_length": length,
              "n_items": metadata["n_items"], "model": metadata["model"], "service_loaded_peak_mb": loaded_mb,
              "runs": runs}
    lines = [f"Measured {report['date']} at commit {report['commit']} on {report['machine']}: `{report['command']}`.",
             "", f"Artifact: {metadata['model']} (fp32, {metadata['n_items'] - 1} items, max_length {length}) served by "
             f"`recbole-llm serve --max-explained {limit}`; each request of full-window histories, timed over HTTP "
             f"(median of 3 after a warm-up); the service process's peak memory was {loaded_mb:.0f} MB after loading "
             "and a small explained request; the limit allows "
             f"{limit} model rows and {EFFECTS_PER_ROW * limit} effects.", "",
             "| k | histories | model rows | effects in the answer | seconds p50 (min / max) | service peak MB |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run['k']} | {run['histories']} | {run['model_rows']} | {run['effects']} | {run['p50_s']:.2f} "
                     f"({run['min_s']:.2f} / {run['max_s']:.2f}) | {run['service_peak_mb']:.0f} |")
    lines += ["", f"One history more gets 413: \"{runs[0]['over_limit']}\"", "",
              f"One k more gets 413: \"{runs[1]['over_limit']}\""]
    write_results("explain_bound", report, lines, RESULTS)


if __name__ == "__main__":
    main()
