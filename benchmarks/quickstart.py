"""Times README's main job on the bundled ml-100k, beside RecBole's Pop on the same split and evaluator.

    python benchmarks/quickstart.py            # writes benchmarks/results/quickstart.{json,md}

Each run is a fresh ``recbole-llm run`` process, as a new user would start it, timed end to end (imports,
dataset, model load, training, evaluation with the best checkpoint reloaded).
"""

from __future__ import annotations

import ast
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# README's main job: BERTRec on the pretrained all-MiniLM-L6-v2 cut to its first layer, full fine-tuning.
MAIN_JOB = [
    "--model=BERTRec", "--dataset=ml-100k",
    "--backbone_layers=1", "--MAX_ITEM_LIST_LENGTH=10", "--epochs=2",
]
# Pop is a general model: give it the sequential models' split (RecBole's sequential.yaml).
POP = [
    "--model=Pop", "--dataset=ml-100k", "--epochs=1",
    "--eval_args={'split': {'LS': 'valid_and_test'}, 'order': 'TO', 'mode': 'full'}",
]
COMMON = ["--show_progress=False", "--metrics=['Recall','MRR','NDCG','Hit','Precision']"]


def run(args: list[str], workdir: Path) -> dict:
    command = [sys.executable, "-m", "recbole_llm", "run", *args, *COMMON]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    seconds = time.perf_counter() - start
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{log[-3000:]}")
    test = re.search(r"test result: OrderedDict\((\[.*?\])\)", log)
    metrics = dict(ast.literal_eval(test.group(1)))
    epochs = re.findall(r"epoch (\d+) training \[time: ([\d.]+)s", log)
    return {
        "command": "recbole-llm run " + " ".join(args),
        "wall_seconds": round(seconds, 1),
        "seconds_per_epoch": [float(t) for _, t in epochs],
        "test": metrics,
    }


def main() -> None:
    import recbole
    import torch
    import transformers

    import recbole_llm

    workdir = HERE / "scratch" / "quickstart"
    workdir.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip() or "unknown",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "recbole": recbole.__version__,
            "transformers": transformers.__version__, "recbole_llm": recbole_llm.__version__,
        },
        "split": "ml-100k, leave-one-out, time order, full ranking (RecBole's sequential defaults)",
        "runs": {"Pop": run(POP, workdir), "BERTRec (main job)": run(MAIN_JOB, workdir)},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quickstart.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Measured {report['date']} at commit {report['commit']} on {report['machine']} "
        f"(`python benchmarks/quickstart.py`).",
        "",
        "| run | command | wall time | test NDCG@10 | test Recall@10 | test MRR@10 |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in report["runs"].items():
        test = row["test"]
        lines.append(
            f"| {name} | `{row['command']}` | {row['wall_seconds']:.0f} s | {test['ndcg@10']:.4f} | "
            f"{test['recall@10']:.4f} | {test['mrr@10']:.4f} |"
        )
    (RESULTS / "quickstart.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
