"""Catalogue scale: latency and memory of the runtime as the catalogue grows, exact against approximate retrieval.

    python benchmarks/catalogue_scale.py --artifact artifacts/bertrec-catalogue [--sizes 1000,10000,100000,1000000]

``--artifact`` is an item-index artifact (``recbole-llm export --item-index``) of a trained model; its
sequence graph is used as it is. For each catalogue size the item table is synthetic: the artifact's own
item vectors, then rows drawn around them (a real row plus Gaussian noise of the table's own spread per
dimension), so that a large catalogue has the structure of a real one rather than of random points. Each
(size, retrieval) runs in its own process: load the artifact (and build the index), warm up, then time
``Recommender.recommend`` on real histories at batch 1 and 64 (median, min, max of the calls), and the
process's peak resident memory. Approximate retrieval (faiss IVF, inner product) is scored against the
exact top-10 of the same process: Recall@10 = |approximate ∩ exact| / 10.

Writes benchmarks/results/catalogue_scale.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, SCRATCH, peak_rss_mb, provenance, require_plotting, run_child,  # noqa: E402
                     write_results)

BATCHES = (1, 64)
CALLS = {1: 50, 64: 10}  # timed calls per batch size, after warm-up


def synthetic_artifact(source: Path, size: int, folder: Path, seed: int = 0) -> Path:
    """A copy of the item-index artifact ``source`` whose catalogue holds ``size`` items (its own first)."""
    from recbole_llm import artifact

    metadata = json.loads((source / artifact.METADATA_FILE).read_text())
    real = np.load(source / artifact.ITEM_VECTORS_FILE)
    tokens = list(metadata["item_tokens"])
    extra = size + 1 - len(tokens)
    if extra < 0:
        vectors, tokens = real[: size + 1], tokens[: size + 1]
    else:
        rng = np.random.default_rng(seed)
        spread = real[1:].std(axis=0, keepdims=True)
        around = real[1 + rng.integers(0, len(real) - 1, size=extra)]
        vectors = np.concatenate([real, around + 0.5 * spread * rng.standard_normal(around.shape, dtype=np.float32)])
        tokens += [f"synthetic-{i}" for i in range(extra)]
    vectors = vectors.astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / artifact.ITEM_VECTORS_FILE, vectors, allow_pickle=False)
    table = artifact.file_record(artifact.read_regular(folder / artifact.ITEM_VECTORS_FILE))
    metadata.update(item_tokens=tokens, n_items=len(tokens), text_tower=None)
    metadata["item_index"] = dict(metadata["item_index"], sha256=table["sha256"])
    # signed as add-items signs a grown catalogue: the runtime refuses files its graph does not vouch for
    signed = artifact.signed_graph((source / artifact.MODEL_FILE).read_bytes(), metadata,
                                   {artifact.ITEM_VECTORS_FILE: table})
    (folder / artifact.MODEL_FILE).write_bytes(signed)
    (folder / artifact.METADATA_FILE).write_text(json.dumps(metadata))
    return folder


def histories(tokens: list[str], rows: int, seed: int = 1) -> list[list[str]]:
    """Histories of 5-50 items of the trained catalogue (the first tokens), as requests send them."""
    rng = np.random.default_rng(seed)
    real = tokens[1:1683] if len(tokens) > 1683 else tokens[1:]
    return [[real[i] for i in rng.integers(0, len(real), size=rng.integers(5, 51))] for _ in range(rows)]


def child(folder: Path, retrieval: str, out: Path) -> None:
    from recbole_llm.serving.runtime import Recommender

    start = time.perf_counter()
    recommender = Recommender(folder, retrieval=retrieval)
    load_seconds = time.perf_counter() - start
    result = {"items": len(recommender.tokens) - 1, "retrieval": retrieval, "load_seconds": round(load_seconds, 2),
              "latency_ms": {}, "session": recommender.session_settings}
    queries = histories(recommender.tokens, 64 * (CALLS[64] + 2))
    for batch in BATCHES:
        calls = [queries[i * batch : (i + 1) * batch] for i in range(CALLS[batch] + 2)]
        for warm in calls[:2]:
            recommender.recommend(warm, k=10)
        times = []
        for call in calls[2:]:
            t = time.perf_counter()
            recommender.recommend(call, k=10)
            times.append((time.perf_counter() - t) * 1000)
        result["latency_ms"][str(batch)] = {"p50": round(statistics.median(times), 3), "min": round(min(times), 3),
                                            "max": round(max(times), 3), "calls": len(times)}
    result["peak_rss_mb"] = peak_rss_mb()
    if retrieval != "exact":  # against the exact answer, in this process, untimed
        exact = Recommender(folder, retrieval="exact")
        sample = queries[:256]
        got = recommender.recommend(sample, k=10)
        want = exact.recommend(sample, k=10)
        result["recall@10"] = round(float(np.mean([len(set(g.items) & set(w.items)) / 10
                                                   for g, w in zip(got, want)])), 4)
    out.write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="an item-index artifact (recbole-llm export --item-index)")
    parser.add_argument("--sizes", default="1000,10000,100000,1000000", help="catalogue sizes (items)")
    parser.add_argument("--retrievals", default="exact,ann", help="exact and/or ann")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "RETRIEVAL"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], args.out)
        return
    if args.artifact is None:
        raise SystemExit("catalogue_scale.py: error: --artifact is required (an artifact exported with --item-index)")
    require_plotting("catalogue_scale.py")
    workdir = SCRATCH / "catalogue_scale"
    workdir.mkdir(parents=True, exist_ok=True)
    report = {**provenance(), "artifact": str(args.artifact), "results": []}
    for size in [int(s) for s in args.sizes.split(",")]:
        folder = synthetic_artifact(args.artifact.resolve(), size, workdir / f"items-{size}")
        for retrieval in args.retrievals.split(","):
            stem = f"{size}-{retrieval}"
            print(f"{size} items, {retrieval} ...", flush=True)
            result = run_child(Path(__file__), ["--child", str(folder), retrieval, "--out", str(workdir / f"{stem}.json")],
                               workdir / f"{stem}.json", workdir / f"{stem}.log")
            report["results"].append(result)
            print(f"  {json.dumps(result['latency_ms'])} recall@10 {result.get('recall@10', 1.0)}", flush=True)
    lines = [f"Measured {report['date']} at commit {report['commit']} on {report['machine']}: `{report['command']}`.",
             "", "Latency of `Recommender.recommend` (k=10, exclude seen), ms: median (min-max); peak RSS of the "
             "process; Recall@10 of approximate retrieval against exact in the same process.", "",
             "| items | retrieval | load + index build | batch 1 | batch 64 | peak RSS | Recall@10 |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        cells = [f"{r['latency_ms'][b]['p50']:.2f} ({r['latency_ms'][b]['min']:.2f}-{r['latency_ms'][b]['max']:.2f})"
                 for b in ("1", "64")]
        lines.append(f"| {r['items']:,} | {r['retrieval']} | {r['load_seconds']:.1f} s | {cells[0]} | {cells[1]} | "
                     f"{r['peak_rss_mb']} MB | {r.get('recall@10', 1.0):.3f} |")
    by = {(r["items"], r["retrieval"]): r for r in report["results"]}
    lines += ["", "Speed-up of ann over exact (median latency):", ""]
    for (items, retrieval), r in sorted(by.items()):
        if retrieval == "ann" and (items, "exact") in by:
            e = by[(items, "exact")]
            ratios = [e["latency_ms"][b]["p50"] / r["latency_ms"][b]["p50"] for b in ("1", "64")]
            lines.append(f"- {items:,} items: {ratios[0]:.1f}x at batch 1, {ratios[1]:.1f}x at batch 64")
    write_results("catalogue_scale", report, lines)
    plot(report, RESULTS / "catalogue_scale.png")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for retrieval, style in (("exact", "o-"), ("ann", "s--")):
        rows = sorted((r for r in report["results"] if r["retrieval"] == retrieval), key=lambda r: r["items"])
        if not rows:
            continue
        for batch in ("1", "64"):
            axes[0].plot([r["items"] for r in rows], [r["latency_ms"][batch]["p50"] for r in rows], style,
                         label=f"{retrieval}, batch {batch}")
        axes[1].plot([r["items"] for r in rows], [r["peak_rss_mb"] for r in rows], style, label=retrieval)
    for ax, label in zip(axes, ("median latency per call (ms)", "peak RSS (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("items in the catalogue")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("recbole_llm runtime: catalogue size, exact vs approximate (faiss IVF)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
