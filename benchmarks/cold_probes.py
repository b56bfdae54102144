"""Cold start, probing the trained model (issue 34): would new items' ID part or a popularity prior from their
text lift them? Post-hoc changes to one trained holdout model, no training.

    python benchmarks/cold_probes.py [--variant year-frozen-drop3]

Takes cold_explore.py's holdout model of ``--variant`` (draw 2020: 168 of 1,682 ml-100k items never trained),
embeds the held-out items' text with its text tower (what add-items does) and ranks the 116 users whose last
item is held out (whole earlier history, seen items excluded; full ranking) in PyTorch, with the new items' rows
or scores changed:

- ``knn``: a new item's ID part imputed as the similarity-weighted mean of the trained ID parts of its k
  text-nearest trained items, times alpha (cold-start imputation from content neighbours);
- ``popularity``: ridge regression from the text vector to log interaction count, fit on trained items; the
  prediction (times beta times the score spread) added to every item's score — fair to warm and new items;
- ``new-only boost``: the same added to the new items only. Shown because it is the trap: it lifts every new
  item for every user, which this protocol (only users whose target is new) rewards and every other user pays
  for; not a method.

Writes benchmarks/results/cold_probes.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import new_items as ni  # noqa: E402
from _common import SCRATCH, provenance, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="year-frozen-drop3")
    args = parser.parse_args()
    import torch
    from scipy.stats import spearmanr
    from transformers import AutoTokenizer

    import recbole_llm  # noqa: F401  (registers the plugin models)
    from recbole_llm.export.pipeline import load_for_export
    from recbole_llm.model.backbone import resolve_pretrained

    torch.set_grad_enabled(False)
    checkpoint = next((SCRATCH / "new_items_explore" / args.variant / "saved").glob("*.pth"))
    config, model, dataset, _ = load_for_export(checkpoint, {"state": "warning"})
    fields = config["item_text_fields"]
    source, name = ni.source_files("ml-100k", None)
    _, item_fields, item_rows = ni.read_table(source / name / f"{name}.item")
    _, inter_fields, inter_rows = ni.read_table(source / name / f"{name}.inter")
    candidates = sorted({r[inter_fields.index("item_id")] for r in inter_rows} & {r[0] for r in item_rows})
    held = sorted(ni.draw_items(candidates, 0.1, 2020))
    texts = {r[0]: ", ".join(r[item_fields.index(f)] for f in fields
                             if item_fields.index(f) < len(r) and r[item_fields.index(f)].strip()) for r in item_rows}
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(model.pretrained_model_name_or_path))
    encoded = tokenizer([texts[i] for i in held], padding="max_length", truncation=True,
                        max_length=model.item_text_max_tokens, return_tensors="pt")
    table = model.item_table()
    new_rows = model.text_tower()(encoded["input_ids"], encoded["attention_mask"])
    text = model.text_projection(model.text_embeddings)
    delta = table - text
    trained = (model.item_trained & model.item_has_text).nonzero().flatten()
    token_to_row = dict(dataset.field2token_id["item_id"])
    first_new = table.shape[0]
    token_to_row.update({item: first_new + j for j, item in enumerate(held)})
    cases = ni.evaluation_users(source / name / f"{name}.inter", set(held))
    length = config["MAX_ITEM_LIST_LENGTH"]
    base = torch.cat([table, new_rows])

    def rank(full: torch.Tensor, bias: torch.Tensor | None = None) -> dict:
        full = full.clone()
        full[0] = 0
        ranks = []
        for history, target in cases:
            seen = [token_to_row[x] for x in history if x in token_to_row]
            rows = seen[-length:]  # the model reads its window; every item of the history is excluded (the runtime's)
            scores = (model.user_vectors(torch.tensor([rows]), torch.tensor([len(rows)]), full) @ full.T)[0]
            if bias is not None:
                scores = scores + bias
            scores[0] = -math.inf
            scores[torch.tensor(seen)] = -math.inf
            ranks.append(int((scores > scores[token_to_row[target]]).sum()))
        return {"ndcg@10": float(np.mean([1 / math.log2(r + 2) if r < 10 else 0.0 for r in ranks])),
                "recall@100": float(np.mean([r < 100 for r in ranks])), "median_rank": float(np.median(ranks)) + 1}

    rows = [("added by text (as deployed)", "", rank(base))]
    similar = torch.nn.functional.normalize(new_rows, dim=-1) @ torch.nn.functional.normalize(text[trained], dim=-1).T
    for k in (5, 20, 50):
        top = similar.topk(k, dim=-1)
        weights = torch.softmax(top.values / 0.05, dim=-1)
        imputed = (weights.unsqueeze(-1) * delta[trained][top.indices]).sum(1)
        for alpha in (0.5, 1.0):
            rows.append(("knn", f"k={k}, alpha={alpha}", rank(torch.cat([table, new_rows + alpha * imputed]))))
    counts = Counter(r[inter_fields.index("item_id")] for r in inter_rows)
    id_to_token = dataset.field2id_token["item_id"]
    x = torch.nn.functional.normalize(text[trained], dim=-1).numpy()
    y = np.log1p([counts[id_to_token[int(i)]] for i in trained])
    x_new = torch.nn.functional.normalize(new_rows, dim=-1).numpy()
    y_new = np.log1p([counts[i] for i in held])
    w = np.linalg.solve(x.T @ x + np.eye(x.shape[1]), x.T @ (y - y.mean()))
    fit = {"train_spearman": float(spearmanr(x @ w, y).correlation),
           "held_out_spearman": float(spearmanr(x_new @ w, y_new).correlation)}
    spread = float(torch.stack([(model.user_vectors(torch.tensor([[token_to_row[t] for t in h[-length:] if t in token_to_row]]),
                                                    torch.tensor([min(len(h), length)]), base) @ base.T)[0]
                                for h, _ in cases[:20]]).std())
    every = torch.cat([torch.tensor(torch.nn.functional.normalize(text, dim=-1).numpy() @ w, dtype=torch.float32),
                       torch.tensor(x_new @ w, dtype=torch.float32)])
    every[0] = 0
    for beta in (0.25, 0.5, 1.0, 2.0):
        rows.append(("popularity", f"beta={beta}", rank(base, beta * spread * every)))
    for beta in (0.5, 1.0, 2.0):
        bias = torch.zeros(base.shape[0])
        bias[first_new:] = beta * spread * every[first_new:]
        rows.append(("new-only boost (the trap)", f"beta={beta}", rank(base, bias)))
    report = {**provenance(), "variant": args.variant, "checkpoint": checkpoint.name, "cases": len(cases),
              "popularity_fit": fit, "score_spread": spread,
              "rows": [{"probe": p, "setting": s, **m} for p, s, m in rows]}
    lines = [f"Measured {report['date']} at commit {report['commit']} on {report['machine']}: `{report['command']}`.", "",
             f"cold_explore's `{args.variant}` holdout model (draw 2020), {len(cases)} users whose last item is one of "
             f"the 168 never-trained items; ranking changed after training only. Text-predicted popularity (ridge, "
             f"log count): Spearman {fit['train_spearman']:.2f} on trained items, {fit['held_out_spearman']:.2f} on "
             "the held-out ones.", "",
             "| probe | setting | NDCG@10 | Recall@100 | median rank |", "|---|---|---|---|---|"]
    lines += [f"| {p} | {s} | {m['ndcg@10']:.4f} | {m['recall@100']:.3f} | {m['median_rank']:.0f} |" for p, s, m in rows]
    write_results("cold_probes", report, lines)


if __name__ == "__main__":
    main()
