"""Cold start, bounds from the data alone: where popularity by release year, and true popularity, rank new items.

    python benchmarks/cold_bounds.py

On new_items.py's held-out draws of ml-100k (seeds 2020-2022, 10% of the items held out of training), the users
whose last interaction is a held-out item are ranked over every item, their seen items excluded, by:

- ``year prior``: trained items by their training interactions, held-out items by the mean interactions of the
  trained items released the same year (what a popularity model could know of a new item from its text's year);
- ``true popularity``: every item by its interactions in the whole data, held-out items included (not knowable
  for a new item: the ceiling of any popularity signal that text could carry).

Prints the median rank (1 = first) and NDCG@10 of the held-out targets per draw, and the release years of draw
2020's targets against the catalogue's. No training; a few seconds.
"""

from __future__ import annotations

import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import new_items as ni  # noqa: E402


def ranked(order: list[str], cases: list[tuple[list[str], str]]) -> tuple[float, float]:
    """(median rank, NDCG@10) of each case's target in ``order`` without the case's history."""
    ranks = []
    for history, target in cases:
        seen = set(history)
        ranks.append([item for item in order if item not in seen].index(target))
    return float(np.median(ranks)) + 1, float(np.mean([1 / math.log2(r + 2) if r < 10 else 0.0 for r in ranks]))


def main() -> None:
    source, name = ni.source_files("ml-100k", None)
    _, item_fields, items = ni.read_table(source / name / f"{name}.item")
    _, fields, inter = ni.read_table(source / name / f"{name}.inter")
    item_column, year_column = item_fields.index("item_id"), item_fields.index("release_year")
    year = {row[item_column]: row[year_column] if len(row) > year_column else "" for row in items}
    interacted = [row[fields.index("item_id")] for row in inter]
    candidates = sorted(set(interacted) & set(year))
    everything = Counter(interacted)
    for seed in (2020, 2021, 2022):
        held = ni.draw_items(candidates, 0.1, seed)
        cases = ni.evaluation_users(source / name / f"{name}.inter", held)
        counts = Counter(item for item in interacted if item not in held)
        by_year = defaultdict(list)
        for item in year:
            if item not in held:
                by_year[year[item]].append(counts.get(item, 0))
        overall = float(np.mean([counts.get(item, 0) for item in year if item not in held]))
        prior = {item: counts.get(item, 0) if item not in held else
                 (float(np.mean(by_year[year[item]])) if by_year.get(year[item]) else overall) for item in year}
        for label, score in (("year prior", prior), ("true popularity", everything)):
            median, ndcg = ranked(sorted(year, key=lambda item: -score.get(item, 0)), cases)
            print(f"draw {seed} ({len(cases)} users): {label}: median rank {median:.0f}, NDCG@10 {ndcg:.4f}")
        if seed == 2020:
            print("  target years:", Counter(year[t] for _, t in cases).most_common(5),
                  "catalogue years:", Counter(year.values()).most_common(5))


if __name__ == "__main__":
    main()
