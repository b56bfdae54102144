"""New items from their text (cold start): how well items a deployed model never saw are recommended once
added by their text, over several held-out draws, per model setting.

    python benchmarks/new_items.py --data-path ../shared/datasets      # ml-100k and ml-1m (cut), anchor, 3 draws
    python benchmarks/new_items.py --datasets ml-100k --settings anchor,anchor-iddrop,uncapped
    python benchmarks/new_items.py [--datasets ml-100k,ml-1m] [--seeds 2020,2021,2022] [--settings anchor]
                                   [--data-path ../shared/datasets] [--holdout 0.1]

Datasets: ``ml-100k``, RecBole's bundled copy, whole (text: movie_title, class; history 50, early stopping
after 5 epochs without gain: quality.py's converged profile); ``ml-1m``, read from ``--data-path``
(``ml-1m/ml-1m.inter`` and ``.item``; text: movie_title, genre), *cut* as quality.py's ml-1m-short: each
user's 10 most recent interactions (6,040 users, 60,400 interactions; history 10, early stopping after 20
epochs: quality.py's sparse profile), because full ml-1m trains for hours per model on a 2-core CPU. The
reports name the cut (``cut``).

Each seed is a held-out draw: 10% (``--holdout``) of the dataset's items that have interactions and text,
drawn with ``numpy.random.default_rng(seed)``, are held out of training entirely (their interactions and
their rows of the item file removed), and BERTRec is trained with RecBole on the rest with that seed,
exported with ``--item-index``, and the held-out items are added to the artifact from their text alone
(``Recommender.add_items``). Ranked for the users whose last interaction (RecBole's leave-one-out test item)
is a held-out item, with their whole earlier history (held-out items in it are known once added), seen items
excluded, through the runtime, by three rankers:

- "added by text": the holdout model with the held-out items added by text;
- "saw them in training": the same setting trained on the whole dataset (seed 2020; one model per dataset
  and setting, shared by every draw, since it does not depend on the draw);
- "popularity fallback": interactions of the holdout data, what a catalogue without text has (new items have
  none, so they come last).

Figures per draw: Recall@10, NDCG@10, Recall@100 and the median rank of the target (1 = first), the ratio
cold / trained NDCG@10 ("added by text" over "saw them in training"), and the two models' own test NDCG@10
on their leave-one-out test sets (RecBole's evaluator); reported as mean ± sample std over the draws.

Settings (``SETTINGS``; quality.py's runs of the same keys, on the converged profile's strongest setting,
drop5-lstm): ``anchor`` (default: quality.py's BERTRec-all-drop5-lstm-anchor, the ID part of id+text capped
at 0.5 times the item's text vector norm, so an item never trained is its text vector, in the same space),
``anchor-iddrop`` (that with DropoutNet's ID dropout 0.3), ``frozen`` (the cap with the text projection frozen,
as Let It Go keeps content embeddings) and ``uncapped`` (id_max_norm null: what the project did before).
benchmarks/cold_explore.py compares more variants on one draw, more cheaply.

Each training runs in its own process. Trained checkpoints and artifacts stay in benchmarks/scratch/new_items
(git-ignored) and are reused while their config is the same (delete that folder to train and export afresh).
Every finished (dataset, setting, draw) is kept as a record, in git, in
benchmarks/results/runs/new_items/<dataset>_<setting>_seed<N>.json (config, both models' training figures,
the three rows and the ratio) and reused by a later run of the same config, so the hours a full run takes
can be spread over sessions; a training cut short starts over. Writes benchmarks/results/new_items.{json,md}
for the datasets, settings and draws asked for (records of others stay on disk).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, SCRATCH, machine, provenance, read_small_json, run_child, write_results  # noqa: E402
from quality import (  # noqa: E402
    EVAL, LATER_KEYS, PROFILES, RUNS, SHORT_HISTORIES, TEXT_FIELDS, prepare_short_histories)

NAME = Path(__file__).name
# The model settings compared, each one config (quality.py's run of that name, with the plugin keys of its
# converged profile, and the keys added later at the values older runs had unless the run sets its own).
_PLUGIN = {**LATER_KEYS, **PROFILES["converged"]["plugin"]}  # id+text, one pretrained layer
QUALITY_RUNS = {"anchor": "BERTRec-all-drop5-lstm-anchor",  # id_max_norm 0.5
                "anchor-iddrop": "BERTRec-all-drop5-lstm-anchor-iddrop",  # and id_dropout_prob 0.3
                "uncapped": "BERTRec-all-drop5-lstm",  # id_max_norm null
                "frozen": "BERTRec-all-drop5-lstm-frozen"}  # text_projection frozen, id_max_norm 0.5
SETTINGS = {setting: {**_PLUGIN, **RUNS[run][1]} for setting, run in QUALITY_RUNS.items()}
DEFAULT_SETTINGS = ["anchor"]
_SHORT, _KEEP = "ml-1m-short", SHORT_HISTORIES["ml-1m-short"][1]
# name on the command line -> RecBole dataset, quality.py profile whose history and patience it trains with,
# and what of the source it is
DATASETS = {
    "ml-100k": {"recbole": "ml-100k", "profile": "converged",
                "cut": "none: the whole of ml-100k (RecBole's bundled copy)"},
    "ml-1m": {"recbole": _SHORT, "profile": "sparse",
              "cut": f"{_SHORT}: each user's {_KEEP} most recent ml-1m interactions (quality.py's sparse profile), "
                     "not full ml-1m"},
}
DEFAULT_SEEDS = [2020, 2021, 2022]
SAW_THEM_SEED = 2020  # the model trained on all of the dataset, one per (dataset, setting)
ROWS = ("added by text", "saw them in training", "popularity fallback")
METRIC_KEYS = ("recall@10", "ndcg@10", "recall@100", "median_rank")
RECORDS = RESULTS / "runs" / "new_items"
RECORD_MAX_BYTES = 2**20  # a record is a few KB


def model_config(dataset: str, setting: str, smoke: bool) -> dict:
    """The RecBole config of a setting on a dataset, without seed and paths: what a record is matched on."""
    spec = DATASETS[dataset]
    config = {"eval_args": EVAL, "metrics": ["Recall", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
              **PROFILES[spec["profile"]]["config"], "item_text_fields": TEXT_FIELDS[spec["recbole"]],
              **SETTINGS[setting]}
    if smoke:
        config["epochs"] = 1
    return json.loads(json.dumps(config))  # as it reads back from JSON (tuples as lists)


def read_table(path: Path) -> tuple[str, list[str], list[list[str]]]:
    """An atomic file: its header line, its field names (without :type) and its rows."""
    header, *rows = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return header, [name.split(":")[0] for name in header.split("\t")], [row.split("\t") for row in rows if row]


def source_files(dataset: str, data_path: str | None) -> tuple[Path, str]:
    """(folder holding the dataset's folder, RecBole dataset name): ml-100k bundled, ml-1m cut from --data-path."""
    if dataset == "ml-100k":
        import recbole

        return Path(recbole.__file__).parent / "dataset_example", "ml-100k"
    return prepare_short_histories(Path(data_path), _SHORT), _SHORT


def draw_items(candidates: list[str], fraction: float, seed: int) -> set[str]:
    rng = np.random.default_rng(seed)
    return set(rng.choice(candidates, size=round(fraction * len(candidates)), replace=False).tolist())


def write_holdout(target: Path, name: str, source: Path, held_out: set[str]) -> None:
    """Dataset ``name`` without the held-out items (their interactions and item rows) in ``target``/<name>-holdout,
    once (a draw's data is the same every time)."""
    folder = target / f"{name}-holdout"
    if (folder / f"{name}-holdout.item").exists():
        return
    staging = target / f".{name}-holdout.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for suffix in ("inter", "item"):
        header, fields, rows = read_table(source / name / f"{name}.{suffix}")
        column = fields.index("item_id")
        kept = [row for row in rows if row[column] not in held_out]
        (staging / f"{name}-holdout.{suffix}").write_text("\n".join([header, *("\t".join(r) for r in kept)]) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def child_train(workdir: Path, out: Path) -> None:
    """Train BERTRec as run_recbole does (the config in ``workdir``/wanted.json) unless ``workdir`` holds a
    model trained with that config, export it with --item-index unless exported since, and write the artifact's
    path and the training's figures to ``out``."""
    import os

    import recbole_llm  # noqa: F401  (registers the plugin models)

    from recbole_llm.export import ExportOptions, export_checkpoint

    wanted = json.loads((workdir / "wanted.json").read_text())
    os.chdir(workdir)
    trained_file, exported_file = workdir / "trained.json", workdir / "exported.json"
    try:
        trained = json.loads(trained_file.read_text())
        if trained.get("config") != wanted["config"] or not Path(trained["checkpoint"]).is_file():
            trained = None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        trained = None
    if trained is None:
        for stale in (trained_file, exported_file):
            stale.unlink(missing_ok=True)
        shutil.rmtree(workdir / "saved", ignore_errors=True)
        trained = train(wanted["dataset"], wanted["config"])
        trained_file.write_text(json.dumps(trained, indent=2) + "\n")
    artifact = workdir / "artifact"
    if not exported_file.exists() or not artifact.is_dir():
        export_checkpoint(trained["checkpoint"], artifact, ExportOptions(item_index=True, force=True))
        exported_file.write_text(json.dumps({"checkpoint": trained["checkpoint"]}) + "\n")
    figures = {k: v for k, v in trained.items() if k not in ("config", "checkpoint")}
    out.write_text(json.dumps({"artifact": str(artifact), **figures}))


def train(dataset: str, config_dict: dict) -> dict:
    """What run_recbole does (as quality.py's runs), keeping the validation scores and the time taken."""
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    config = Config(model="BERTRec", dataset=dataset, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    data = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, data)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    scores: list[float] = []
    started = time.perf_counter()
    best_valid, _ = trainer.fit(train_data, valid_data, saved=True, show_progress=False,
                                callback_fn=lambda epoch, score: scores.append(float(score)))
    seconds = time.perf_counter() - started
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    return {"config": config_dict, "checkpoint": str(Path(trainer.saved_model_file).resolve()),
            "test": {k: float(v) for k, v in test.items()}, "best_valid": float(best_valid),
            "epochs": len(scores), "best_epoch": int(np.argmax(scores)) + 1 if scores else 0, "valid_ndcg@10": scores,
            "stopped_by": "epoch cap" if len(scores) >= config["epochs"] else "early stopping",
            "train_seconds": round(seconds, 1), "seconds_per_epoch": round(seconds / max(len(scores), 1), 1),
            "machine": machine()}


def quality_model(dataset: str, setting: str) -> dict | None:
    """The model quality.py trained for this setting on the whole dataset with the saw-them seed, when its record
    and its kept best checkpoint are both here: the same data, setting and seed, so the same training, and
    hours of CPU not spent twice. ``{"checkpoint", "test", "best_valid", "epochs", "best_epoch", "source"}``."""
    spec = DATASETS[dataset]
    folder = PROFILES[spec["profile"]].get("workdir", f"quality_{spec['profile']}")
    stem = f"{spec['recbole']}_{QUALITY_RUNS[setting]}_seed{SAW_THEM_SEED}"
    record_file, checkpoint = RESULTS / "runs" / folder / f"{stem}.json", SCRATCH / folder / f"{stem}.best.pth"
    if not (record_file.is_file() and checkpoint.is_file()):
        return None
    record = json.loads(record_file.read_text())
    scores = record["valid_ndcg@10"]
    return {"checkpoint": str(checkpoint.resolve()), "test": record["test"], "best_valid": max(scores),
            "epochs": record["epochs"], "best_epoch": record["epochs_to_best"],
            "train_seconds": round(record["seconds_per_epoch"] * record["epochs"], 1),
            "seconds_per_epoch": record["seconds_per_epoch"], "machine": record["machine"],
            "source": f"quality.py's {spec['profile']} run {stem} (its best checkpoint)"}


def trained_model(workdir: Path, dataset: str, config: dict, seed: int, data_path: Path, label: str,
                  trained: dict | None = None) -> dict:
    """BERTRec with ``config`` trained with ``seed`` on ``dataset`` of ``data_path`` and exported, in ``workdir``
    (its own process; reused when trained so before, or ``trained`` elsewhere: see :func:`quality_model`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    run = {**config, "seed": seed, "data_path": str(data_path), "show_progress": False,
           "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", *config["item_text_fields"]]},
           "checkpoint_dir": str(workdir / "saved"), "save_latest": False}  # a training cut short starts over
    if trained is not None and not (workdir / "trained.json").exists():
        (workdir / "trained.json").write_text(json.dumps({"config": run, **trained}, indent=2) + "\n")
    (workdir / "wanted.json").write_text(json.dumps({"dataset": dataset, "config": run}, indent=2) + "\n")
    print(f"  {label}: training (or reusing) and exporting in {workdir} ...", flush=True)
    done = workdir / "result.json"
    result = run_child(Path(__file__), ["--child", str(workdir), "--out", str(done)], done, workdir / "run.log")
    print(f"  {label}: test NDCG@10 {result['test'].get('ndcg@10', float('nan')):.4f}, {result['epochs']} epochs, "
          f"{result['train_seconds']:.0f} s of training", flush=True)
    return result


def evaluation_users(inter: Path, held_out: set[str]) -> list[tuple[list[str], str]]:
    """(history, target) of every user whose last interaction is a held-out item: history in time order."""
    _, fields, rows = read_table(inter)
    user, item, when = fields.index("user_id"), fields.index("item_id"), fields.index("timestamp")
    by_user: dict[str, list[tuple[float, int, str]]] = {}
    for order, row in enumerate(rows):
        by_user.setdefault(row[user], []).append((float(row[when]), order, row[item]))
    cases = []
    for events in by_user.values():
        events.sort()  # RecBole orders by time, then file order (a stable sort)
        items = [i for _, _, i in events]
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


def evaluate_draw(source: Path, name: str, holdout_data: Path, held_out: set[str], added_artifact: str,
                  saw_artifact: str, text_fields: list[str] | None = None) -> dict:
    """The three rows of one draw, on its users; held-out items added with ``text_fields`` (default: the
    dataset's TEXT_FIELDS, as the models were trained)."""
    from recbole_llm.serving.runtime import Recommender

    cases = evaluation_users(source / name / f"{name}.inter", held_out)
    histories, targets = [c[0] for c in cases], [c[1] for c in cases]
    _, fields, item_rows = read_table(source / name / f"{name}.item")
    text_fields = text_fields or TEXT_FIELDS[name]
    texts = {row[0]: {f: row[fields.index(f)] for f in text_fields if fields.index(f) < len(row)}
             for row in item_rows}
    added = Recommender(added_artifact)
    added.add_items({item: {k: v for k, v in texts[item].items() if v.strip()} for item in sorted(held_out)})
    saw = Recommender(saw_artifact)
    results = {}
    for row, recommender in (("added by text", added), ("saw them in training", saw)):
        answers = recommender.recommend(histories, k=recommender.max_k, exclude_seen=True)  # a full ranking
        results[row] = metrics([a.items for a in answers], targets)
    # popularity: interactions of the holdout data; items without any (held-out ones last) after them
    _, fields, inter = read_table(holdout_data / f"{name}-holdout" / f"{name}-holdout.inter")
    column = fields.index("item_id")
    counts = Counter(row[column] for row in inter)
    popular = [item for item, _ in counts.most_common()]
    popular += sorted(i for i in texts if i not in counts and i not in held_out) + sorted(held_out)
    ranked = []
    for history in histories:
        seen = set(history)
        ranked.append([i for i in popular if i not in seen])
    results["popularity fallback"] = metrics(ranked, targets)
    return {"held_out_items": len(held_out), "evaluation_users": len(cases), "catalogue_items": saw.max_k,
            "results": results}


# --- records -------------------------------------------------------------------------------------------------

def _score(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def record_problem(record, dataset: str, setting: str, seed: int) -> str:
    """What is wrong with a parsed record, or "" when it holds every field the report reads, typed."""
    if not isinstance(record, dict):
        return f"not a JSON object (a {type(record).__name__})"
    missing = [k for k in ("dataset", "setting", "draw", "config", "training", "results", "ratio",
                           "held_out_items", "evaluation_users") if k not in record]
    if missing:
        return f"incomplete (missing {', '.join(missing)})"
    for key, expected in (("dataset", dataset), ("setting", setting), ("draw", seed)):
        if record[key] != expected:
            return f"another draw's ({key} {json.dumps(record[key])[:40]}, its name says {expected!r})"
    if not isinstance(record["config"], dict):
        return "damaged (config is not an object)"
    for key in ("held_out_items", "evaluation_users"):
        if not _count(record[key]):
            return f"damaged ({key} is {json.dumps(record[key])[:40]}, not a whole number >= 0)"
    if not (record["ratio"] is None or _score(record["ratio"])):
        return f"damaged (ratio is {json.dumps(record['ratio'])[:40]}, not null or a number >= 0)"
    training = record["training"]
    for model in ("holdout", "saw them"):
        figures = training.get(model) if isinstance(training, dict) else None
        test = figures.get("test") if isinstance(figures, dict) else None
        if not (isinstance(test, dict) and _score(test.get("ndcg@10"))):
            return f"damaged (training.{model}.test.ndcg@10 missing or not a number)"
    results = record["results"]
    for row in ROWS:
        values = results.get(row) if isinstance(results, dict) else None
        if not isinstance(values, dict):
            return f"incomplete (missing results.{row})"
        for key in METRIC_KEYS:
            if not _score(values.get(key)):
                return f"damaged (results.{row}.{key} is {json.dumps(values.get(key))[:40]}, not a number >= 0)"
    return ""


def read_record(path: Path, dataset: str, setting: str, seed: int) -> dict:
    """A draw's record. SystemExit (one line naming the file and the fix) when it is not a regular file of
    UTF-8 JSON with every field, typed, of this (dataset, setting, draw): reusing or silently recomputing over
    a damaged record would both be wrong."""
    record, problem = read_small_json(path, RECORD_MAX_BYTES, "a record")
    problem = problem or record_problem(record, dataset, setting, seed)
    if problem:
        remove = f"remove it with `rm -r {path}`" if "folder" in problem else "delete it"
        fix = (f"restore it with `git checkout -- {path}` or {remove}" if RESULTS in path.absolute().parents
               else remove)
        raise SystemExit(f"{NAME}: error: record {path} is {problem}; {fix} to evaluate that draw again")
    return record


def write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(path)  # whole or absent


# --- the report -------------------------------------------------------------------------------------------------

def summary(draws: dict[str, dict]) -> dict:
    """Mean and sample std (None for one draw) over draws of each row's metrics, the ratio and test NDCG@10."""
    def mean_std(values: list[float]) -> tuple[float | None, float | None]:
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None

    out = {"mean": {}, "std": {}}
    for row in ROWS:
        pairs = {k: mean_std([d["results"][row][k] for d in draws.values()]) for k in METRIC_KEYS}
        out["mean"][row] = {k: m for k, (m, _) in pairs.items()}
        out["std"][row] = {k: s for k, (_, s) in pairs.items()}
    out["ratio"], out["ratio_std"] = mean_std([d["ratio"] for d in draws.values() if d["ratio"] is not None])
    out["holdout_test_ndcg@10"], out["holdout_test_ndcg@10_std"] = mean_std(
        [d["training"]["holdout"]["test"]["ndcg@10"] for d in draws.values()])
    return out


def shown(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown(report: dict, datasets: list[str], settings: list[str], seeds: list[int], fraction: float,
             smoke: bool) -> list[str]:
    anchor = SETTINGS["anchor"]
    described = []
    for setting in settings:
        changed = {k: v for k, v in SETTINGS[setting].items() if anchor.get(k) != v}
        described.append(f"`{setting}` " + (f"`{json.dumps(anchor)}`" if setting == "anchor" else
                                            f"= anchor with `{json.dumps(changed)}`"))
    lines = [f"Measured {report['date']} at commit {report['commit']} on {report['machine']}: "
             f"`{report['command']}`.", ""]
    if smoke:
        lines += ["**Smoke run (1 epoch per model): not a measurement.**", ""]
    lines += [f"Cold start: per draw (seed), {fraction:g} of the items with interactions held out of training "
              "entirely, BERTRec trained on the rest (that seed), exported with an item index, the held-out items "
              "added by text; users whose last interaction is a held-out item ranked with their whole earlier "
              "history, seen items excluded, through the runtime. \"Saw them\": the same setting trained on all "
              f"the data (seed {SAW_THEM_SEED}, one model for every draw). Mean ± sample std over draws "
              f"{', '.join(map(str, seeds))}; ratio: cold / trained NDCG@10 per draw. Settings: "
              + "; ".join(described) + ".", ""]
    for dataset in datasets:
        part = report[dataset]
        present = {s: part["settings"][s] for s in settings if part["settings"].get(s, {}).get("draws")}
        lines += [f"### {dataset}", "", f"Cut: {part['cut']}."]
        for setting, entry in present.items():
            draws = entry["draws"]
            first = next(iter(draws.values()))
            users = ", ".join(str(d["evaluation_users"]) for d in draws.values())
            lines.append(f"`{setting}`: {first['held_out_items']} of {part['candidate_items']} items held out per "
                         f"draw, {users} users ranked (draws {', '.join(draws)}), catalogue "
                         f"{first['catalogue_items']} items.")
        lines += ["", "| setting | held-out targets ranked by | Recall@10 | NDCG@10 | Recall@100 | median rank | "
                      "cold / trained NDCG@10 | draws |", "|---|---|---|---|---|---|---|---|"]
        for setting, entry in present.items():
            for row in ROWS:
                mean, std = entry["mean"][row], entry["std"][row]
                ratio = shown(entry["ratio"], entry["ratio_std"], 2) if row == ROWS[0] else ""
                scores = " | ".join(shown(mean[k], std[k]) for k in METRIC_KEYS[:3])
                lines.append(f"| {setting if row == ROWS[0] else ''} | {row} | {scores} | "
                             f"{shown(mean['median_rank'], std['median_rank'], 0)} | {ratio} | {len(entry['draws'])} |")
        tests = [f"`{s}` saw them {e['saw_them_test_ndcg@10']:.4f}, holdout "
                 f"{shown(e['holdout_test_ndcg@10'], e['holdout_test_ndcg@10_std'])}" for s, e in present.items()]
        lines += ["", "Test NDCG@10 on the models' own leave-one-out test sets (RecBole's evaluator): "
                  + "; ".join(tests) + ".", ""]
    return lines


# --- command line -------------------------------------------------------------------------------------------------

def listed(value: str, flag: str, known) -> list[str]:
    items = [item.strip() for item in value.split(",")]
    if not all(items):
        raise SystemExit(f"{NAME}: error: {flag} {value!r} has an empty entry; give comma-separated values")
    unknown = [item for item in items if known is not None and item not in known]
    if unknown:
        raise SystemExit(f"{NAME}: error: {flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    if len(set(items)) != len(items):
        raise SystemExit(f"{NAME}: error: {flag} {value!r} names an entry twice")
    return items


def seed_number(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**32:
        raise SystemExit(f"{NAME}: error: --seeds: {text!r} is not a seed; give integers from 0 to 2**32-1")
    return seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="ml-100k,ml-1m",
                        help=f"comma-separated, of {','.join(DATASETS)} (default both; ml-1m is the ml-1m-short cut)")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                        help="held-out draws, each also its holdout model's training seed (default 2020,2021,2022)")
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                        help=f"comma-separated, of {','.join(SETTINGS)} (default anchor)")
    parser.add_argument("--data-path", help="folder holding ml-1m/ml-1m.inter and .item (e.g. ../shared/datasets)")
    parser.add_argument("--holdout", type=float, default=0.1, help="fraction of items held out (default 0.1)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # 1 epoch, all under scratch
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_train(args.child, args.out)
        return

    datasets = listed(args.datasets, "--datasets", list(DATASETS))
    settings = listed(args.settings, "--settings", list(SETTINGS))
    seeds = [seed_number(s) for s in listed(args.seeds, "--seeds", None)]
    if not 0 < args.holdout < 1:
        raise SystemExit(f"{NAME}: error: --holdout {args.holdout:g}: give a fraction between 0 and 1")
    if "ml-1m" in datasets:
        folder = Path(args.data_path) / "ml-1m" if args.data_path else None
        if folder is None or not ((folder / "ml-1m.inter").is_file() and (folder / "ml-1m.item").is_file()):
            where = f" ({args.data_path}: no ml-1m/ml-1m.inter and ml-1m.item there)" if args.data_path else ""
            raise SystemExit(f"{NAME}: error: ml-1m is read from --data-path{where}; pass the folder holding ml-1m/ "
                             "(e.g. --data-path ../shared/datasets), or --datasets ml-100k")
        args.data_path = str(Path(args.data_path).resolve())
    root = SCRATCH / ("new_items_smoke" if args.smoke else "new_items")
    records = root / "runs" if args.smoke else RECORDS
    results_folder = root if args.smoke else RESULTS

    report = {**provenance(), "holdout": args.holdout, "seeds": seeds, "settings": settings,
              "saw_them_seed": SAW_THEM_SEED, "setting_configs": {s: SETTINGS[s] for s in settings}}
    if args.smoke:
        report["smoke"] = "1 epoch per model: not a measurement"
    for dataset in datasets:
        source, name = source_files(dataset, args.data_path)
        _, fields, inter_rows = read_table(source / name / f"{name}.inter")
        _, item_fields, item_rows = read_table(source / name / f"{name}.item")
        with_text = {row[0] for row in item_rows
                     if any(item_fields.index(f) < len(row) and row[item_fields.index(f)].strip()
                            for f in TEXT_FIELDS[name])}
        column = fields.index("item_id")
        candidates = sorted({row[column] for row in inter_rows} & with_text)
        del inter_rows
        part = report[dataset] = {"cut": DATASETS[dataset]["cut"], "recbole_dataset": name,
                                  "candidate_items": len(candidates), "settings": {}}
        for setting in settings:
            config = model_config(dataset, setting, args.smoke)
            workdir = root / dataset / setting
            draws: dict[str, dict] = {}
            saw = None
            for seed in seeds:
                path = records / f"{dataset}_{setting}_seed{seed}.json"
                wanted = {"holdout": args.holdout, "draw": seed, "cut": DATASETS[dataset]["cut"], "model": config,
                          "seeds": {"holdout model": seed, "saw-them model": SAW_THEM_SEED}}
                if path.exists() or path.is_symlink():
                    record = read_record(path, dataset, setting, seed)
                    if record["config"] == wanted:
                        print(f"{dataset} {setting} draw {seed}: reusing {path}", flush=True)
                        draws[str(seed)] = record
                        continue
                    print(f"{dataset} {setting} draw {seed}: {path.name} has another config; evaluating again",
                          flush=True)
                print(f"{dataset} {setting} draw {seed} ...", flush=True)
                if saw is None:
                    saw = trained_model(workdir / "saw_them", name, config, SAW_THEM_SEED, source, "saw them",
                                        None if args.smoke else quality_model(dataset, setting))
                held_out = draw_items(candidates, args.holdout, seed)
                data = root / "datasets" / dataset / f"draw{seed}-holdout{args.holdout:g}"
                write_holdout(data, name, source, held_out)
                holdout = trained_model(workdir / f"draw{seed}", f"{name}-holdout", config, seed, data, "holdout")
                figures = evaluate_draw(source, name, data, held_out, holdout["artifact"], saw["artifact"])
                cold, trained = (figures["results"][row]["ndcg@10"] for row in ROWS[:2])
                record = {"dataset": dataset, "setting": setting, "draw": seed, "config": wanted, **figures,
                          "ratio": cold / trained if trained > 0 else None,
                          "training": {"holdout": {k: v for k, v in holdout.items() if k != "artifact"},
                                       "saw them": {k: v for k, v in saw.items() if k != "artifact"}},
                          "date": report["date"], "commit": report["commit"]}
                write_record(path, record)
                print(f"  added by text NDCG@10 {cold:.4f}, saw them {trained:.4f}; record {path}", flush=True)
                draws[str(seed)] = record
            part["settings"][setting] = {
                "config": config,
                "saw_them_test_ndcg@10": next(iter(draws.values()))["training"]["saw them"]["test"]["ndcg@10"],
                "draws": {seed: {k: v for k, v in record.items() if k not in ("dataset", "setting", "draw", "config")}
                          for seed, record in draws.items()},
                **summary(draws)}
    write_results("new_items", report, markdown(report, datasets, settings, seeds, args.holdout, args.smoke),
                  results_folder)


def entry() -> int:
    try:
        main()
    except KeyboardInterrupt:
        print(f"{NAME}: interrupted; finished draws are kept as records: run the same command again to continue",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(entry())
