"""Retraining as data grows (issue 37): continue yesterday's checkpoint with ``init_from``, or train from scratch?

    python benchmarks/continual.py                       # seeds 2020,2021,2022
    python benchmarks/continual.py --seeds 2020

ml-100k (RecBole's bundled copy) split by time: the oldest 80% of interactions (ties in file order) are the
*old* data — its item file holds only the items seen there, so the newer 20% brings new users and new items —
and all of it is the *new* data. Per seed: BERTRec with item text (``SETTING``: new_items.py's anchor setting
with the release year in the text, the frozen text projection and ID dropout 0.3 — cold_explore's best for items
known only by text) is trained on the old data to convergence (early stopping); then on all the data (a) from
that checkpoint with ``init_from`` and (b) from scratch, each to convergence, same seed and config otherwise.

Per run: test NDCG@10 and TailNDCG@10 (RecBole's evaluator, leave-one-out on all the data), new-item NDCG@10
(the users whose test item is one the old data never had, ranked by the exported artifact with their whole
history, seen items excluded), the epochs and CPU seconds until validation NDCG@10 first reached 95% of the
run's own best and 95% of the scratch run's best. The old model's own training is not counted in (a): it was
paid the day before.

Each training runs in its own process (new_items.py's child); checkpoints and artifacts stay in
benchmarks/scratch/continual and are reused while their config is the same. Every finished seed is a record in
benchmarks/results/runs/continual/seed<N>.json (reused, so seeds can be spread over sessions). Writes
benchmarks/results/continual.{json,md} for the seeds asked for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import new_items as ni  # noqa: E402
from _common import RESULTS, SCRATCH, provenance, write_results  # noqa: E402

NAME = Path(__file__).name
OLD_SHARE = 0.8
_YEAR = ["movie_title", "release_year", "class"]
SETTING = {"text_projection": "frozen", "id_dropout_prob": 0.3, "item_text_fields": _YEAR}
METRICS = {"metrics": ["Recall", "NDCG", "TailNDCG"], "topk": [10]}
DEFAULT_SEEDS = [2020, 2021, 2022]
RECORDS = RESULTS / "runs" / "continual"
ROOT = SCRATCH / "continual"


def write_split(root: Path) -> tuple[Path, set[str]]:
    """``root``/ml-old (the oldest 80% of ml-100k's interactions, the items seen there) and ``root``/ml-all
    (all of it), once; returns ``root`` and the items the old data never had."""
    source, name = ni.source_files("ml-100k", None)
    header, fields, rows = ni.read_table(source / name / f"{name}.inter")
    when, item = fields.index("timestamp"), fields.index("item_id")
    ordered = sorted(range(len(rows)), key=lambda i: (float(rows[i][when]), i))  # ties in file order
    old = [rows[i] for i in sorted(ordered[: int(OLD_SHARE * len(rows))])]
    old_items = {row[item] for row in old}
    item_header, _, item_rows = ni.read_table(source / name / f"{name}.item")
    for dataset, inter, films in (("ml-old", old, [r for r in item_rows if r[0] in old_items]),
                                  ("ml-all", rows, item_rows)):
        folder = root / dataset
        if (folder / f"{dataset}.item").exists():
            continue
        staging = root / f".{dataset}.tmp"
        staging.mkdir(parents=True, exist_ok=True)
        (staging / f"{dataset}.inter").write_text("\n".join([header, *("\t".join(r) for r in inter)]) + "\n")
        (staging / f"{dataset}.item").write_text("\n".join([item_header, *("\t".join(r) for r in films)]) + "\n")
        staging.rename(folder)
    return root, {row[item] for row in rows} - old_items


def epochs_to(scores: list[float], target: float) -> int | None:
    """The first epoch (1-based) whose validation score reached ``target``, or None."""
    return next((i + 1 for i, score in enumerate(scores) if score >= target), None)


def run_seed(seed: int) -> dict:
    config = {**ni.model_config("ml-100k", "anchor", False), **SETTING, **METRICS}
    record_file = RECORDS / f"seed{seed}.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("config") == config:
            print(f"seed {seed}: reusing {record_file}", flush=True)
            return record
    data, new_items = write_split(ROOT / "datasets")
    old = ni.trained_model(ROOT / f"seed{seed}" / "old", "ml-old", config, seed, data, f"seed {seed} old data")
    checkpoint = json.loads((ROOT / f"seed{seed}" / "old" / "trained.json").read_text())["checkpoint"]
    runs = {"init_from": ni.trained_model(ROOT / f"seed{seed}" / "init_from", "ml-all",
                                          {**config, "init_from": checkpoint}, seed, data, f"seed {seed} init_from"),
            "scratch": ni.trained_model(ROOT / f"seed{seed}" / "scratch", "ml-all", config, seed, data,
                                        f"seed {seed} scratch")}
    from recbole_llm.serving.runtime import Recommender

    cases = ni.evaluation_users(data / "ml-all" / "ml-all.inter", new_items)
    histories, targets = [c[0] for c in cases], [c[1] for c in cases]
    scratch_best = runs["scratch"]["best_valid"]
    figures = {}
    for label, run in runs.items():
        recommender = Recommender(run["artifact"])
        answers = recommender.recommend(histories, k=recommender.max_k, exclude_seen=True)
        scores = run["valid_ndcg@10"]
        own, common = epochs_to(scores, 0.95 * max(scores)), epochs_to(scores, 0.95 * scratch_best)
        figures[label] = {
            "test_ndcg@10": run["test"]["ndcg@10"], "test_tailndcg@10": run["test"]["tailndcg@10"],
            "new_items": ni.metrics([a.items for a in answers], targets), "best_valid": run["best_valid"],
            "epochs": run["epochs"], "seconds_per_epoch": run["seconds_per_epoch"],
            "train_seconds": run["train_seconds"],
            "epochs_to_95_own": own, "epochs_to_95_scratch": common,
            "seconds_to_95_own": None if own is None else round(own * run["seconds_per_epoch"], 1),
            "seconds_to_95_scratch": None if common is None else round(common * run["seconds_per_epoch"], 1),
            "valid_ndcg@10": scores, "stopped_by": run["stopped_by"]}
    record = {"seed": seed, "config": config, "new_items": len(new_items), "new_item_users": len(cases),
              "old": {k: old[k] for k in ("test", "best_valid", "epochs", "train_seconds", "seconds_per_epoch")},
              "runs": figures, **{k: provenance()[k] for k in ("date", "commit", "machine")}}
    RECORDS.mkdir(parents=True, exist_ok=True)
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def mean_std(values: list[float], digits: int = 4) -> str:
    """Mean ± sample standard deviation over seeds, ``digits`` decimals (0: whole seconds and counts)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 seed)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated seeds")
    args = parser.parse_args()
    seeds = [int(s) for s in ni.listed(args.seeds, "--seeds", None)]
    records = [run_seed(seed) for seed in seeds]
    report = {**provenance(), "seeds": seeds, "records": records}
    lines = [f"Measured {report['date']} at commit {report['commit']} on {report['machine']}: `{report['command']}` "
             "(each seed's record names its own commit and machine).", "",
             f"ml-100k split by time: old data = the oldest {OLD_SHARE:.0%} of interactions "
             f"({records[0]['new_items']} items appear only in the newer part; {records[0]['new_item_users']} users' "
             "test item is one of them). BERTRec id+text (release year in the text, frozen text projection, ID "
             "dropout 0.3), early stopping. (a) init_from the old data's best checkpoint, (b) from scratch, both on "
             "all the data. Seconds: CPU training time to the first epoch whose validation NDCG@10 reached 95% of "
             "the best (own / of the scratch run's); the old model's own training is not counted in (a).", "",
             "| run | test NDCG@10 | tail NDCG@10 | new items NDCG@10 | new items median rank | epochs | "
             "s to 95% own best | s to 95% of scratch best | s in all |", "|---|---|---|---|---|---|---|---|---|"]
    for label in ("init_from", "scratch"):
        runs = [r["runs"][label] for r in records]
        lines.append("| " + " | ".join([
            label, mean_std([r["test_ndcg@10"] for r in runs]), mean_std([r["test_tailndcg@10"] for r in runs]),
            mean_std([r["new_items"]["ndcg@10"] for r in runs]),
            mean_std([r["new_items"]["median_rank"] for r in runs], 0), mean_std([r["epochs"] for r in runs], 1),
            mean_std([r["seconds_to_95_own"] for r in runs], 0), mean_std([r["seconds_to_95_scratch"] for r in runs], 0),
            mean_std([r["train_seconds"] for r in runs], 0)]) + " |")
    lines += ["", "Per seed (epochs to 95% of the scratch run's best validation NDCG@10 in brackets):", "",
              "| seed | run | test NDCG@10 | tail NDCG@10 | new items NDCG@10 | median rank | epochs | s to 95% of "
              "scratch best | s in all |", "|---|---|---|---|---|---|---|---|---|"]
    for record in records:
        for label in ("init_from", "scratch"):
            r = record["runs"][label]
            to95 = "–" if r["seconds_to_95_scratch"] is None else \
                f"{r['seconds_to_95_scratch']:.0f} ({r['epochs_to_95_scratch']})"
            lines.append(f"| {record['seed']} | {label} | {r['test_ndcg@10']:.4f} | {r['test_tailndcg@10']:.4f} | "
                         f"{r['new_items']['ndcg@10']:.4f} | {r['new_items']['median_rank']} | {r['epochs']} | "
                         f"{to95} | {r['train_seconds']:.0f} |")
    lines += ["", "The continued run's validation items of users with no newer interaction are those the old model's "
              "early stopping chose it on, so its validation score starts high and its early stopping may come early "
              "(seed 2020: 9 epochs); test items were never used for selection by either run."]
    write_results("continual", report, lines)


if __name__ == "__main__":
    main()
