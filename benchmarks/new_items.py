"""New items from their text: how well items a deployed model never saw are recommended once added by text.

    python benchmarks/new_items.py [--holdout 0.1] [--seed 2020]

On ml-100k, 10% of the items (drawn with ``--seed``) are held out of training entirely: their interactions
and their rows of the item file are removed, and BERTRec (item text, ``train_positions: all``) is trained
with RecBole on the rest, exported with ``--item-index``, and the held-out items are added to the artifact
from their text alone (``Recommender.add_items``). The same model trained on all of ml-100k (it saw them)
and popularity (the fallback a catalogue without text has: new items have no interactions) are measured
on the same users: those whose last interaction (RecBole's leave-one-out test item) is a held-out item,
with their whole earlier history (held-out items in it are known once added). Recall@10 and NDCG@10
through the runtime, seen items excluded. Each training runs in its own process.

Writes benchmarks/results/new_items.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, SCRATCH, provenance, run_child, write_results  # noqa: E402

MODEL = {  # the plugin's strongest setting on ml-100k so far (benchmarks/quality.py, converged profile)
    "item_repr": "id+text", "item_text_fields": ["movie_title", "class"], "backbone_layers": 1,
    "train_positions": "all", "train_batch_size": 128, "hidden_dropout_prob": 0.3, "attn_dropout_prob": 0.3,
    "MAX_ITEM_LIST_LENGTH": 50, "epochs": 500, "stopping_step": 5, "eval_batch_size": 4096,
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
    "metrics": ["Recall", "NDCG"], "topk": [10], "valid_metric": "NDCG@10", "show_progress": False,
    "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title", "class"]},
}


def source_files() -> Path:
    import recbole

    return Path(recbole.__file__).parent / "dataset_example" / "ml-100k"


def read_table(path: Path) -> tuple[str, list[list[str]]]:
    header, *rows = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return header, [row.split("\t") for row in rows if row]


def write_holdout(folder: Path, held_out: set[str]) -> Path:
    """ml-100k without the held-out items: their interactions and their item rows."""
    target = folder / "ml-100k-holdout"
    target.mkdir(parents=True, exist_ok=True)
    for suffix in ("inter", "item"):
        header, rows = read_table(source_files() / f"ml-100k.{suffix}")
        column = 1 if suffix == "inter" else 0
        kept = [row for row in rows if row[column] not in held_out]
        (target / f"ml-100k-holdout.{suffix}").write_text("\n".join([header, *("\t".join(r) for r in kept)]) + "\n")
    return target


def child_train(dataset: str, data_path: str, seed: int, workdir: Path, out: Path) -> None:
    """Train with RecBole (run_recbole) unless trained already, then export with --item-index; write the
    artifact's path and the training's figures."""
    import os

    import recbole_llm  # noqa: F401
    from recbole.quick_start import run_recbole

    from recbole_llm.export import ExportOptions, export_checkpoint

    os.chdir(workdir)
    trained = workdir / "trained.json"
    if not trained.exists():
        result = run_recbole(model="BERTRec", dataset=dataset, config_dict={
            **MODEL, "data_path": data_path, "seed": seed, "checkpoint_dir": str(workdir / "saved")})
        trained.write_text(json.dumps({"test": {k: float(v) for k, v in result["test_result"].items()},
                                       "best_valid": float(result["best_valid_score"])}))
    (checkpoint,) = [p for p in (workdir / "saved").glob("BERTRec-*.pth") if not p.name.endswith("-latest.pth")]
    artifact = export_checkpoint(checkpoint, workdir / "artifact", ExportOptions(item_index=True, force=True))
    out.write_text(json.dumps({"artifact": str(artifact.path), **json.loads(trained.read_text())}))


def evaluation_users(held_out: set[str]) -> list[tuple[list[str], str]]:
    """(history, target) of every user whose last interaction is a held-out item: history in time order."""
    _, rows = read_table(source_files() / "ml-100k.inter")
    by_user: dict[str, list[tuple[float, int, str]]] = {}
    for order, (user, item, _rating, timestamp) in enumerate(row[:4] for row in rows):
        by_user.setdefault(user, []).append((float(timestamp), order, item))
    cases = []
    for events in by_user.values():
        events.sort()  # RecBole orders by time, then file order (a stable sort)
        items = [item for _, _, item in events]
        if items[-1] in held_out:
            cases.append((items[:-1], items[-1]))
    return cases


def metrics(ranked: list[list[str]], targets: list[str]) -> dict[str, float]:
    """Recall@10, NDCG@10, Recall@100 and the median rank (1 = first) of each target in a full ranking."""
    ranks = [r.index(t) if t in r else len(r) for r, t in zip(ranked, targets)]
    return {"recall@10": float(np.mean([r < 10 for r in ranks])),
            "ndcg@10": float(np.mean([1 / math.log2(r + 2) if r < 10 else 0.0 for r in ranks])),
            "recall@100": float(np.mean([r < 100 for r in ranks])),
            "median_rank": float(np.median(ranks)) + 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--holdout", type=float, default=0.1, help="fraction of items held out (default 0.1)")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--child", nargs=3, metavar=("DATASET", "DATA_PATH", "WORKDIR"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_train(args.child[0], args.child[1], args.seed, Path(args.child[2]), args.out)
        return

    from recbole_llm.runtime import Recommender

    workdir = SCRATCH / "new_items"
    workdir.mkdir(parents=True, exist_ok=True)
    header, item_rows = read_table(source_files() / "ml-100k.item")
    items = sorted(row[0] for row in item_rows)
    rng = np.random.default_rng(args.seed)
    held_out = set(rng.choice(items, size=round(args.holdout * len(items)), replace=False).tolist())
    data = write_holdout(workdir / "data", held_out)
    runs = {}
    for name, dataset, data_path in (("holdout", "ml-100k-holdout", str(data.parent)),
                                     ("saw them", "ml-100k", str(source_files().parent))):
        folder = workdir / name.replace(" ", "_")
        folder.mkdir(exist_ok=True)
        done = folder / "result.json"
        # trains once (trained.json), exports every time: the artifact follows the code
        print(f"training (or reusing) and exporting {name} ...", flush=True)
        runs[name] = run_child(Path(__file__), ["--seed", str(args.seed), "--child", dataset, data_path,
                                                str(folder), "--out", str(done)], done, folder / "run.log")
    cases = evaluation_users(held_out)
    histories, targets = [c[0] for c in cases], [c[1] for c in cases]

    texts = {row[0]: {"movie_title": row[1], "class": row[3] if len(row) > 3 else ""} for row in item_rows}
    added = Recommender(runs["holdout"]["artifact"])
    added.add_items({item: {k: v for k, v in texts[item].items() if v} for item in sorted(held_out)})
    saw = Recommender(runs["saw them"]["artifact"])
    results = {}
    for name, recommender in (("added by text", added), ("saw them in training", saw)):
        answers = recommender.recommend(histories, k=recommender.max_k, exclude_seen=True)  # a full ranking
        results[name] = metrics([a.items for a in answers], targets)
    # popularity: training interactions of the holdout data; new items have none, so they come last
    _, inter = read_table(data / "ml-100k-holdout.inter")
    popular = [item for item, _ in Counter(row[1] for row in inter).most_common()]
    popular += sorted(held_out)
    ranked = [[i for i in popular if i not in set(h)] for h in histories]
    results["popularity fallback"] = metrics(ranked, targets)
    report = {**provenance(), "held_out_items": len(held_out), "evaluation_users": len(cases), "model": MODEL,
              "training": {name: {k: v for k, v in run.items() if k != "artifact"} for name, run in runs.items()},
              "results": results}
    lines = [f"Measured {report['date']} at commit {report['commit']} on {report['machine']}: `{report['command']}`.",
             "", f"ml-100k, {len(held_out)} of {len(items)} items (10%, seed {args.seed}) held out of training; "
             f"{len(cases)} users whose last interaction is a held-out item, ranked with their whole earlier "
             "history, seen items excluded, through the runtime (item-index artifacts). BERTRec: "
             f"`{json.dumps({k: MODEL[k] for k in ('item_repr', 'backbone_layers', 'train_positions', 'hidden_dropout_prob')})}`, "
             "trained to early stopping.", "",
             f"| held-out targets ranked by | Recall@10 | NDCG@10 | Recall@100 | median rank of {len(items)} |",
             "|---|---|---|---|---|"]
    for name, values in results.items():
        lines.append(f"| {name} | {values['recall@10']:.4f} | {values['ndcg@10']:.4f} | {values['recall@100']:.4f} | "
                     f"{values['median_rank']:.0f} |")
    lines += ["", "Test NDCG@10 of the two trained models on their own leave-one-out test sets (RecBole's evaluator): "
              + ", ".join(f"{name} {run['test'].get('ndcg@10', float('nan')):.4f}" for name, run in runs.items()) + "."]
    write_results("new_items", report, lines)


if __name__ == "__main__":
    main()
