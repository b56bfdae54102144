"""Cold start, exploring: which item representation lets items added by text reach a top 10 (issue 34).

    python benchmarks/cold_explore.py                      # every variant in VARIANTS, draw 2020
    python benchmarks/cold_explore.py --variants frozen-cap05,cap01-drop5

One held-out draw of new_items.py on ml-100k (seed 2020: 168 of 1,682 items held out of training entirely,
the 116 users whose last interaction is one of them), one holdout model per variant (new_items.py's
``anchor`` setting with the variant's keys), the held-out items added to its artifact by text, and only the
"added by text" row: Recall@10, NDCG@10, Recall@100, median rank, beside the holdout model's own test and best
validation NDCG@10 (warm items, RecBole's evaluator). Cheaper than new_items.py (no saw-them model, one draw),
so that variants can be compared before one is measured in full there; one draw of 116 users is noisy.

Each variant is a record in benchmarks/results/runs/cold_explore/<variant>.json, reused while its config is the
same; models stay in benchmarks/scratch/new_items_explore. Writes benchmarks/results/cold_explore.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import new_items as ni  # noqa: E402
from _common import RESULTS, SCRATCH, provenance, write_results  # noqa: E402

SEED = 2020
HOLDOUT = 0.1  # new_items.py's default
_YEAR = ["movie_title", "release_year", "class"]
# variant -> keys over new_items.py's `anchor` setting (drop5-lstm, id+text, id_max_norm 0.5, trained projection)
VARIANTS = {
    "uncapped": {"id_max_norm": None},
    "anchor": {},
    "anchor-iddrop": {"id_dropout_prob": 0.3},
    "cap025-drop5": {"id_max_norm": 0.25, "id_dropout_prob": 0.5},
    "cap01-drop5": {"id_max_norm": 0.1, "id_dropout_prob": 0.5},
    "frozen-cap05": {"text_projection": "frozen"},
    "frozen-cap05-drop3": {"text_projection": "frozen", "id_dropout_prob": 0.3},
    # the release year in the text: ml-100k's test items are mostly the newest films, which titles do not date
    "year-frozen-drop3": {"text_projection": "frozen", "id_dropout_prob": 0.3, "item_text_fields": _YEAR},
    "year-frozen-drop5": {"text_projection": "frozen", "id_dropout_prob": 0.5, "item_text_fields": _YEAR},
    # a trained vector per text token beside the frozen text vector: what warm items teach a genre or a year
    # reaches new items with the same tokens
    "bag-year-frozen-drop3": {"text_projection": "frozen", "id_dropout_prob": 0.3, "item_text_fields": _YEAR,
                              "text_token_bag": True},
    "bag-year-frozen-drop5": {"text_projection": "frozen", "id_dropout_prob": 0.5, "item_text_fields": _YEAR,
                              "text_token_bag": True},
}
# Tried and not run to convergence: text_encoder: trained (item text through the sequence encoder's layer at every
# step, Recformer's direction) costs 250-280 s per epoch here against 24 s frozen: a GPU's job.
RECORDS = RESULTS / "runs" / "cold_explore"


def run_variant(variant: str) -> dict:
    """Train (or reuse) the variant's holdout model of draw SEED and rank the held-out items added by text."""
    ni.SETTINGS[variant] = {**ni.SETTINGS["anchor"], **VARIANTS[variant]}
    config = ni.model_config("ml-100k", variant, False)
    record_file = RECORDS / f"{variant}.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("config") == config:
            print(f"{variant}: reusing {record_file}", flush=True)
            return record
    source, name = ni.source_files("ml-100k", None)
    _, item_fields, item_rows = ni.read_table(source / name / f"{name}.item")
    _, fields, inter_rows = ni.read_table(source / name / f"{name}.inter")
    candidates = sorted({row[fields.index("item_id")] for row in inter_rows} & {row[0] for row in item_rows})
    held_out = ni.draw_items(candidates, HOLDOUT, SEED)
    root = SCRATCH / "new_items_explore"
    data = root / "datasets" / f"draw{SEED}"
    ni.write_holdout(data, name, source, held_out)
    run = ni.trained_model(root / variant, f"{name}-holdout", config, SEED, data, variant)
    # evaluate_draw ranks with a saw-them artifact too; only the "added by text" row is kept here
    figures = ni.evaluate_draw(source, name, data, held_out, run["artifact"], run["artifact"],
                               config["item_text_fields"])
    record = {"variant": variant, "keys": VARIANTS[variant], "config": config, "draw": SEED,
              "held_out_items": figures["held_out_items"], "evaluation_users": figures["evaluation_users"],
              "added_by_text": figures["results"]["added by text"],
              "holdout_test_ndcg@10": run["test"]["ndcg@10"], "holdout_best_valid_ndcg@10": run["best_valid"],
              "epochs": run["epochs"], **{k: provenance()[k] for k in ("date", "commit", "machine")}}
    RECORDS.mkdir(parents=True, exist_ok=True)
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {','.join(VARIANTS)}")
    args = parser.parse_args()
    variants = ni.listed(args.variants, "--variants", list(VARIANTS))
    records = {variant: run_variant(variant) for variant in variants}
    report = {**provenance(), "draw": SEED, "variants": records}
    lines = [f"Measured {report['date']} at commit {report['commit']} on {report['machine']}: `{report['command']}` "
             "(each variant's record names the commit and machine it ran on).", "",
             "ml-100k, new_items.py's draw 2020 (168 of 1,682 items held out of training, 116 users whose last "
             "interaction is one of them); BERTRec drop5-lstm `id+text` with the variant's keys; held-out items added "
             "by text. Warm: the holdout model's own leave-one-out test and best validation NDCG@10.", "",
             "| variant | keys | added by text: Recall@10 | NDCG@10 | Recall@100 | median rank | warm test NDCG@10 "
             "| warm valid NDCG@10 |", "|---|---|---|---|---|---|---|---|"]
    for variant, r in records.items():
        cold = r["added_by_text"]
        lines.append(f"| {variant} | `{json.dumps(r['keys'])}` | {cold['recall@10']:.4f} | {cold['ndcg@10']:.4f} | "
                     f"{cold['recall@100']:.4f} | {cold['median_rank']:.0f} | {r['holdout_test_ndcg@10']:.4f} | "
                     f"{r['holdout_best_valid_ndcg@10']:.4f} |")
    write_results("cold_explore", report, lines)


if __name__ == "__main__":
    main()
