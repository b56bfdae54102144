"""Evaluation cost of BERTRec's length-grouped full ranking against one pass at the batch's full width.

    python benchmarks/eval_grouping.py [--layers 2,4,8] [--length 200] [--repeats 5]

RecBole's full-ranking evaluation hands the model batches of up to ``eval_batch_size`` users whose histories are
padded to ``MAX_ITEM_LIST_LENGTH``. ``BERTRec.full_sort_predict`` encodes them in groups of rows of similar
length, each group cut to its longest history (``recbole_llm.model.bertrec.EVAL_GROUP_ROWS`` rows a group);
``export_scores`` (what the ONNX graph traces) encodes the whole batch at its width. This script times both on
one batch of 1,024 histories whose lengths are drawn from MovieLens-1M's users (each user's item count less the
validation and test items, cut to ``--length``), with a random encoder of SASRec's width (64, 2 heads, inner
256) at each depth, on one thread: CPU seconds per batch (median, min, max over the repeats after one warm-up
call) and the largest score difference between the two.

Needs ``--data-path`` holding ml-1m (default ../shared/datasets). Writes benchmarks/results/eval_grouping.{json,md}
(with other --layers, --length or --repeats than the defaults: benchmarks/scratch/eval_grouping/).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, SCRATCH, provenance, write_results  # noqa: E402

BATCH = 1024


def ml1m_lengths(data_path: Path, length: int) -> list[int]:
    """Each ml-1m user's training-history length at evaluation: item count - 2 (validation, test), cut to
    ``length``; users with fewer than 3 items (no training history) left out. SystemExit (one line) for a file
    that is unreadable, has no RecBole header, a line without its 3 tab-separated fields, or under BATCH users."""
    path = data_path / "ml-1m" / "ml-1m.inter"
    counts: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as inter:
            header = inter.readline()
            if not header.startswith("user_id:token\t"):
                raise ValueError("no RecBole header (user_id:token, item_id:token, ...)")
            for number, line in enumerate(inter, start=2):
                fields = line.rstrip("\n").split("\t")
                if len(fields) < 3 or not fields[0]:
                    raise ValueError(f"line {number} lacks the 3 tab-separated fields of the header")
                counts[fields[0]] = counts.get(fields[0], 0) + 1
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SystemExit(f"eval_grouping.py: error: {path} does not read ({error}); give --data-path the folder "
                         "holding RecBole's ml-1m (e.g. ../shared/datasets)") from None
    lengths = [min(n - 2, length) for n in counts.values() if n >= 3]
    if len(lengths) < BATCH:
        raise SystemExit(f"eval_grouping.py: error: {path} has {len(lengths)} users with a training history, "
                         f"fewer than the batch of {BATCH} measured; give the whole ml-1m")
    return lengths


def build(layers: int, width: int):
    """A random BERTRec encoder, SASRec's width, ``layers`` deep, over ml-100k's items (the catalogue only sizes
    the final product). SystemExit (one line naming the flag) for a depth or length the plugin refuses."""
    import recbole_llm  # noqa: F401  (registers BERTRec with RecBole's get_model: before importing it)
    from recbole.config import Config
    from recbole.data import create_dataset
    from recbole.utils import get_model, init_seed

    try:
        config = Config(model="BERTRec", dataset="ml-100k", config_dict={
            "pretrained_model_name_or_path": None, "n_layers": layers, "n_heads": 2, "hidden_size": 64,
            "inner_size": 256, "MAX_ITEM_LIST_LENGTH": width, "train_positions": "all", "item_repr": "id",
            "attn_dropout_prob": 0.0, "show_progress": False})
        init_seed(2020, True)
        return get_model("BERTRec")(config, create_dataset(config)).eval()
    except recbole_llm.RecboleLLMError as error:
        raise SystemExit(f"eval_grouping.py: error: --layers {layers} / --length {width}: {error}") from None


def measure(model, layers: int, lengths: list[int], width: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    drawn = torch.tensor(lengths)[torch.randperm(len(lengths), generator=generator)[:BATCH]]
    item_seq = torch.randint(1, model.n_items, (BATCH, width), generator=generator)
    item_seq = item_seq * (torch.arange(width) < drawn.unsqueeze(1))
    interaction = {model.ITEM_SEQ: item_seq, model.ITEM_SEQ_LEN: drawn}
    times: dict[str, list[float]] = {"full width": [], "grouped": []}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first call of each warms up and is dropped
            start = time.process_time()
            whole = model.export_scores(item_seq, drawn)
            times["full width"].append(time.process_time() - start)
            start = time.process_time()
            grouped = model.full_sort_predict(interaction)
            times["grouped"].append(time.process_time() - start)
    return {"layers": layers, "fill": round(float(drawn.float().mean()) / width, 3),
            "max_abs_difference": float((whole - grouped).abs().max()),
            **{name: {"median": round(statistics.median(v[1:]), 3), "min": round(min(v[1:]), 3),
                      "max": round(max(v[1:]), 3)} for name, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", type=Path, default=Path("../shared/datasets"),
                        help="folder holding ml-1m/ (only its user counts are read)")
    parser.add_argument("--layers", default="2,4,8", help="comma-separated encoder depths")
    parser.add_argument("--length", type=int, default=200, help="MAX_ITEM_LIST_LENGTH (history length)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each path, after one warm-up")
    args = parser.parse_args()
    if not (args.data_path / "ml-1m" / "ml-1m.inter").is_file():
        raise SystemExit(f"eval_grouping.py: error: --data-path {args.data_path} has no ml-1m/ml-1m.inter; give the "
                         "folder that holds ml-1m/ (e.g. ../shared/datasets)")
    try:
        depths = [int(x) for x in args.layers.split(",")]
    except ValueError:
        raise SystemExit(f"eval_grouping.py: error: --layers {args.layers!r}: give comma-separated whole numbers, "
                         "e.g. 2,4,8") from None
    for flag, values in (("--layers", depths), ("--length", [args.length]), ("--repeats", [args.repeats])):
        if not values or min(values) <= 0:
            raise SystemExit(f"eval_grouping.py: error: {flag} {getattr(args, flag[2:])}: give a positive whole "
                             "number (--layers: comma-separated, e.g. 2,4,8)")
    lengths = ml1m_lengths(args.data_path, args.length)
    models = [build(d, args.length) for d in depths]  # every setting checked before anything is timed
    report = {**provenance(), "batch": BATCH, "length": args.length,
              "rows": [measure(m, d, lengths, args.length, args.repeats) for m, d in zip(models, depths)]}
    lines = [f"Measured {report['date']} at commit {report['commit']} on {report['machine']}: "
             f"`{report['command']}`.", "",
             f"One batch of {BATCH} histories with ml-1m's lengths at history {args.length}, a random encoder 64 "
             "wide, one thread; CPU seconds per batch, median (min-max) of the timed calls.", "",
             "| layers | fill | full width | grouped | speed-up | max score difference |", "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        full, grouped = row["full width"], row["grouped"]
        lines.append(f"| {row['layers']} | {row['fill']:.2f} | "
                     f"{full['median']:.2f} ({full['min']:.2f}-{full['max']:.2f}) | "
                     f"{grouped['median']:.2f} ({grouped['min']:.2f}-{grouped['max']:.2f}) | "
                     f"{full['median'] / grouped['median']:.2f}x | {row['max_abs_difference']:.1e} |")
    # other settings than the defaults are trials: keep them out of results/
    complete = all(getattr(args, key) == parser.get_default(key) for key in ("layers", "length", "repeats"))
    write_results("eval_grouping", report, lines, RESULTS if complete else SCRATCH / "eval_grouping")


if __name__ == "__main__":
    main()
