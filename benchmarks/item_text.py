"""Item text on ml-100k: overall and long-tail NDCG@10 for item_repr id, text and id+text, beside SASRec.

    python benchmarks/item_text.py            # writes benchmarks/results/item_text.{json,md}

Same split and evaluator for every run (leave-one-out, time order, full ranking), same seed, each run a
fresh ``recbole-llm run`` process. Tail = test users whose target item had at most ``tail_threshold`` (20)
training interactions. The plugin runs use the pretrained all-MiniLM-L6-v2 cut to one layer and 10 items
of history, two epochs: the CPU budget of README's main job. SASRec gets RecBole's defaults at the same
history length and ten epochs.
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
COMMON = [
    "--dataset=ml-100k", "--MAX_ITEM_LIST_LENGTH=10", "--show_progress=False",
    "--metrics=['Recall','NDCG','TailNDCG','TailRecall']", "--topk=[10]", "--valid_metric=NDCG@10",
]
TEXT = [
    "--backbone_layers=1", "--epochs=2", "--item_text_fields=['movie_title','class']",
    "--load_col={'inter': ['user_id','item_id','timestamp'], 'item': ['item_id','movie_title','class']}",
]
RUNS = {
    "SASRec": ["--model=SASRec", "--epochs=10"],
    "BERTRec id": ["--model=BERTRec", *TEXT, "--item_repr=id"],
    "BERTRec text": ["--model=BERTRec", *TEXT, "--item_repr=text"],
    "BERTRec id+text": ["--model=BERTRec", *TEXT, "--item_repr=id+text"],
}


def run(args: list[str], workdir: Path) -> dict:
    command = [sys.executable, "-m", "recbole_llm", "run", *args, *COMMON]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    seconds = time.perf_counter() - start
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{log[-3000:]}")
    test = dict(ast.literal_eval(re.search(r"test result: OrderedDict\((\[.*?\])\)", log).group(1)))
    return {"command": "recbole-llm run " + " ".join(args + COMMON), "wall_seconds": round(seconds, 1), "test": test}


def main() -> None:
    workdir = HERE / "scratch" / "item_text"
    workdir.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip() or "unknown",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "split": "ml-100k, leave-one-out, time order, full ranking; tail = target with <= 20 training interactions",
        "runs": {name: run(args, workdir) for name, args in RUNS.items()},
    }
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "item_text.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Measured {report['date']} at commit {report['commit']} on {report['machine']} "
        "(`python benchmarks/item_text.py`).",
        "",
        "| model | test NDCG@10 | test Recall@10 | tail NDCG@10 | tail Recall@10 | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in report["runs"].items():
        t = row["test"]
        lines.append(
            f"| {name} | {t['ndcg@10']:.4f} | {t['recall@10']:.4f} | {t['tailndcg@10']:.4f} | "
            f"{t['tailrecall@10']:.4f} | {row['wall_seconds']:.0f} s |"
        )
    (results / "item_text.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
