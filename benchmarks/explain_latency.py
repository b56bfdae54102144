"""What an explanation costs: Recommender.recommend with and without explain=True on one artifact.

    python benchmarks/inference.py ...        # first: writes the artifacts to scratch/inference_cpu/
    python benchmarks/explain_latency.py      # writes benchmarks/results/explain_latency.{md,json}

The optimized fp32 artifact of the inference benchmark (BERTLoRA, 6 layers, scores every item), real test
histories of 50 and 10 items, one history per call and 8 per call, k=10; each setting warmed up, then timed
call by call in this one process (ONNX Runtime and numpy only). Latency p50 with min / max.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, SCRATCH, provenance, write_results  # noqa: E402

from recbole_llm.serving.runtime import Recommender  # noqa: E402

WORK = SCRATCH / "inference_cpu"
CALLS = 30


def main() -> None:
    artifact = WORK / "ort-optimized"
    if not (artifact / "metadata.json").is_file():
        raise SystemExit("explain_latency.py: error: run benchmarks/inference.py first (it writes the artifact)")
    recommender = Recommender(artifact)
    inputs = np.load(WORK / "inputs.npz")
    report = {**provenance(), "artifact": str(artifact), "runs": []}
    for length in (10, 50):
        seq, seq_len = inputs["item_seq_50"], inputs["item_length_50"]
        histories = [[recommender.tokens[i] for i in row[:n][-length:]] for row, n in zip(seq, seq_len)]
        for batch in (1, 8):
            chosen = histories[:batch]
            for explain in (False, True):
                for _ in range(3):
                    recommender.recommend(chosen, k=10, explain=explain)
                times = []
                for _ in range(CALLS):
                    start = time.perf_counter()
                    recommender.recommend(chosen, k=10, explain=explain)
                    times.append(1000 * (time.perf_counter() - start))
                report["runs"].append({"length": length, "batch": batch, "explain": explain,
                                       "p50_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)})
    lines = [f"Measured {report['date']} at commit {report['commit']} on {report['machine']}: `{report['command']}`.",
             "", "Artifact: the optimized fp32 BERTLoRA of results/inference_cpu.md (6 layers, 1,682 items scored); "
             f"{CALLS} timed calls per setting after 3 warm-up calls; k=10.", "",
             "| history length | histories per call | explain | p50 ms | min / max ms | x without |", "|---|---|---|---|---|---|"]
    for run in report["runs"]:
        base = next(r for r in report["runs"] if r["length"] == run["length"] and r["batch"] == run["batch"]
                    and not r["explain"])
        lines.append(f"| {run['length']} | {run['batch']} | {'yes' if run['explain'] else 'no'} | {run['p50_ms']:.1f} | "
                     f"{run['min_ms']:.1f} / {run['max_ms']:.1f} | {run['p50_ms'] / base['p50_ms']:.1f} |")
    write_results("explain_latency", report, lines, RESULTS)
    print(json.dumps(report["runs"][-1]))


if __name__ == "__main__":
    main()
