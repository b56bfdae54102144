"""Inference speed: PyTorch eager, torch.compile and ONNX Runtime (fp32, optimized, int8 / fp16) on one model.

    python benchmarks/inference.py                 # CPU: writes benchmarks/results/inference_cpu.{json,md,png}
    python benchmarks/inference.py --device cuda   # GPU: eager fp32 / bf16, torch.compile, ORT CUDA fp32 / fp16
    python benchmarks/inference.py --openvino-python .venv-ov/bin/python   # also ONNX Runtime's OpenVINO EP

``--openvino-python`` names the interpreter of an environment with onnxruntime-openvino (which replaces
onnxruntime, so it gets its own: ``python -m venv .venv-ov && .venv-ov/bin/pip install onnxruntime-openvino
numpy && .venv-ov/bin/pip install --no-deps -e .``); it runs the fp32 artifact on the OpenVINO execution
provider (CPU device), beside the others.

One process trains BERTLoRA on the default pretrained encoder (all-MiniLM-L6-v2, all 6 layers, 50 items of
history) on ml-100k for a short budget and exports it three (CPU) or two (GPU) ways with
``recbole_llm.export``. Then every runtime runs in its own fresh process on the same inputs — real test
histories of ml-100k cut to 20 and 50 items, batch sizes 1, 8, 64, 256 (GPU: 50 items, batch sizes 1, 64,
256) — scoring all items (the exported
``scores`` graph, what ``full_sort_predict`` returns). Each shape is warmed up, then timed call by call;
the table gives p50 / p99 latency with min / max, histories and items ranked per second, and ratios
against PyTorch eager from this run. Parity: each runtime's scores on 256 probe rows against eager's.
ONNX Runtime processes import onnxruntime and numpy only, as a serving process would.
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
from _common import RESULTS, SCRATCH, provenance, require_plotting, run_child, write_results  # noqa: E402

# (history lengths, batch sizes) per device; main() picks the device's before anything reads them
SHAPES = {"cpu": ((20, 50), (1, 8, 64, 256)), "cuda": ((50,), (1, 64, 256))}
LENGTHS, BATCH_SIZES = SHAPES["cpu"]
TRAIN_BUDGET_CPU_S = 300
RUNTIMES = {
    "cpu": ["eager", "compile", "ort-fp32", "ort-optimized", "ort-int8"],
    "cuda": ["eager", "eager-bf16", "compile", "ort-fp32", "ort-fp16"],
}
ARTIFACTS = {"ort-fp32": {}, "ort-optimized": {"optimize": True},
             "ort-int8": {"optimize": True, "int8": True}, "ort-fp16": {"optimize": True, "fp16": True}}
PROBE_ROWS = 256
SETTINGS: dict = {}  # a runtime's thread and session settings, recorded with its timings


# ---------------------------------------------------------------------------------------------------------
# one process: train, export, write the inputs


def prepare(device: str, workdir: Path, out: Path, budget: float, checkpoint: Path | None = None) -> None:
    import recbole_llm  # noqa: F401
    from recbole.utils import get_trainer

    if checkpoint is not None:  # a model trained elsewhere (longer, or on a GPU): evaluate it, then export
        from recbole_llm.export import load_for_export

        config, model, _, test_data = load_for_export(checkpoint)
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        trainer.saved_model_file = str(checkpoint)
        test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
        spent = None
    else:
        trainer, model, test_data, test, spent = train(device, workdir, budget)
    write_inputs_and_export(device, workdir, out, trainer, model, test_data, test, spent)


def train(device: str, workdir: Path, budget: float):
    """BERTLoRA on ml-100k for ``budget`` CPU-seconds; (trainer, model, test_data, test metrics, CPU-s spent)."""
    import recbole_llm  # noqa: F401
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    from quality import BudgetedLoader, BudgetSpent

    config = Config(model="BERTLoRA", dataset="ml-100k", config_dict={
        "MAX_ITEM_LIST_LENGTH": max(LENGTHS), "epochs": 1, "show_progress": False,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
        "use_gpu": device == "cuda", "checkpoint_dir": str(workdir / "saved"),
    })
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    budgeted = BudgetedLoader(train_data, time.process_time, budget)

    def stop(epoch_idx, score):
        if budgeted.exhausted:
            raise BudgetSpent

    try:
        trainer.fit(budgeted, valid_data, saved=True, show_progress=False, callback_fn=stop)
    except BudgetSpent:
        pass
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    return trainer, model, test_data, test, budgeted.spent


def write_inputs_and_export(device, workdir, out, trainer, model, test_data, test, spent) -> None:
    import torch

    from recbole_llm.export import ExportOptions, export_checkpoint

    # inputs: real test histories, the most recent L items (all of them when a user has fewer)
    seqs, lens = [], []
    for batch in test_data:
        seqs.append(batch[0][model.ITEM_SEQ].cpu().numpy())
        lens.append(batch[0][model.ITEM_SEQ_LEN].cpu().numpy())
    seqs, lens = np.concatenate(seqs), np.concatenate(lens)
    rows = max(max(BATCH_SIZES), PROBE_ROWS)
    inputs = {}
    for length in LENGTHS:
        cut = np.zeros((rows, length), dtype=np.int64)
        cut_len = np.minimum(lens[:rows], length).astype(np.int64)
        for row in range(rows):
            cut[row, : cut_len[row]] = seqs[row, lens[row] - cut_len[row] : lens[row]]
        inputs[f"item_seq_{length}"], inputs[f"item_length_{length}"] = cut, cut_len
    np.savez(workdir / "inputs.npz", **inputs)

    artifacts = {}
    for runtime in RUNTIMES[device]:
        if runtime in ARTIFACTS:
            # the benchmark reports the int8 / fp16 overlap itself, so export does not refuse on it
            options = ExportOptions(force=True, min_overlap=0.0, **ARTIFACTS[runtime])
            folder = export_checkpoint(trainer.saved_model_file, workdir / runtime, options).path
            metadata = json.loads((folder / "metadata.json").read_text())
            artifacts[runtime] = {"folder": str(folder), "validation": metadata["validation"][-1],
                                  "size_mb": round((folder / "model.onnx").stat().st_size / 2**20, 1)}
    out.write_text(json.dumps({
        "checkpoint": trainer.saved_model_file, "test": {k: float(v) for k, v in test.items()},
        "trained_batches_cpu_s": None if spent is None else round(spent, 1), "n_items": int(model.n_items),
        "artifacts": artifacts, "torch_threads": torch.get_num_threads(),
    }, indent=2))


# ---------------------------------------------------------------------------------------------------------
# one process per runtime


def scorer(runtime: str, device: str, prepared: dict):
    """A function (item_seq, item_length) -> scores as numpy, for this runtime."""
    if runtime.startswith("ort-"):
        import onnxruntime as ort

        from recbole_llm.serving.sessions import session_options

        providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        artifact = "ort-fp32" if runtime == "ort-openvino" else runtime
        if runtime == "ort-openvino":  # OpenVINO compiles the plain graph (ONNX Runtime's fused ops are its own)
            providers = [("OpenVINOExecutionProvider", {"device_type": "CPU"}), "CPUExecutionProvider"]
        path = str(Path(prepared["artifacts"][artifact]["folder"]) / "model.onnx")
        options, SETTINGS["session"] = session_options()  # what recbole_llm.serving.runtime.Recommender runs with
        session = ort.InferenceSession(path, options, providers=providers)
        SETTINGS["providers"] = session.get_providers()
        SETTINGS["onnxruntime"] = ort.__version__
        return lambda seq, length: session.run(["scores"], {"item_seq": seq, "item_length": length})[0]

    import torch

    from recbole_llm.export import ScoringGraph, export_model, load_for_export

    _, model, _, _ = load_for_export(prepared["checkpoint"])
    # the same merged model the ONNX graph holds, with PyTorch's own (SDPA) attention
    exported, _ = export_model(model, onnx_attention=False)
    SETTINGS["torch_threads"] = torch.get_num_threads()
    graph = ScoringGraph(exported, top_k=None).eval().to(device)
    if runtime == "compile":
        graph = torch.compile(graph)
    bf16 = runtime == "eager-bf16"

    def run(seq, length):
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            scores = graph(torch.from_numpy(seq).to(device), torch.from_numpy(length).to(device))
            return scores.float().cpu().numpy()

    return run


def measure(runtime: str, device: str, prepared_file: Path, workdir: Path, out: Path, seconds: float) -> None:
    prepared = json.loads(prepared_file.read_text())
    inputs = np.load(workdir / "inputs.npz")
    started = time.perf_counter()
    score = scorer(runtime, device, prepared)
    load_seconds = time.perf_counter() - started
    timings = {}
    for length in LENGTHS:
        seq, seq_len = inputs[f"item_seq_{length}"], inputs[f"item_length_{length}"]
        for batch in BATCH_SIZES:
            args = (np.ascontiguousarray(seq[:batch]), np.ascontiguousarray(seq_len[:batch]))
            for _ in range(3):  # warm-up (and torch.compile's compilation for this shape)
                score(*args)
            latencies, spent = [], 0.0
            while (len(latencies) < 10 or spent < seconds) and len(latencies) < 2000:
                start = time.perf_counter()
                score(*args)
                latencies.append(time.perf_counter() - start)
                spent += latencies[-1]
            latencies_ms = sorted(1000 * t for t in latencies)
            timings[f"{length}x{batch}"] = {
                "length": length, "batch": batch, "calls": len(latencies_ms),
                "p50_ms": statistics.median(latencies_ms),
                "p99_ms": float(np.percentile(latencies_ms, 99)),
                "min_ms": latencies_ms[0], "max_ms": latencies_ms[-1],
            }
    probe = score(inputs[f"item_seq_{max(LENGTHS)}"][:PROBE_ROWS], inputs[f"item_length_{max(LENGTHS)}"][:PROBE_ROWS])
    np.save(workdir / f"probe_{runtime}.npy", probe.astype(np.float32))
    out.write_text(json.dumps({"runtime": runtime, "load_seconds": round(load_seconds, 1), "settings": SETTINGS,
                               "timings": timings}))


# ---------------------------------------------------------------------------------------------------------
# report


def parity(reference: np.ndarray, scores: np.ndarray) -> dict:
    reference, scores = reference.copy(), scores.copy()
    reference[:, 0] = scores[:, 0] = -np.inf  # padding is not an item
    want = np.argsort(-reference, axis=1, kind="stable")[:, :10]
    got = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    return {
        "max_abs_diff": float(np.max(np.abs(reference[:, 1:] - scores[:, 1:]))),
        "top10_overlap": float(np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])),
        "top10_identical_rows": float(np.mean(np.all(got == want, axis=1))),
    }


def markdown(report: dict) -> list[str]:
    runs, prepared = report["runtimes"], report["prepared"]
    lines = [
        f"Measured {report['date']} at commit {report['commit']} on {report['machine']}: `{report['command']}`.",
        "",
        f"Model: BERTLoRA on the full pretrained all-MiniLM-L6-v2 (6 layers, 384 wide), LoRA merged, "
        f"{prepared['n_items'] - 1} ml-100k items scored per history; "
        + (f"trained {prepared['trained_batches_cpu_s']} CPU-s" if prepared["trained_batches_cpu_s"] is not None
           else f"checkpoint {Path(prepared['checkpoint']).name}")
        + f" (test NDCG@10 {prepared['test']['ndcg@10']:.4f}). Latency per call in ms, median of the "
        "timed calls after 3 warm-up calls; ratio = eager p50 / runtime p50.",
        "",
        "Threads and sessions: "
        + "; ".join(f"{name}: {json.dumps(run.get('settings', {}))}" for name, run in runs.items()
                    if name in ("eager", "ort-fp32")) + " (every ONNX Runtime variant as ort-fp32).",
        "",
        "| length | batch | runtime | p50 ms | p99 ms | min / max ms | histories/s | items ranked/s | "
        "x eager (p50) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, eager in runs["eager"]["timings"].items():
        for runtime, run in runs.items():
            t = run["timings"][key]
            per_s = t["batch"] / (t["p50_ms"] / 1000)
            lines.append(
                f"| {t['length']} | {t['batch']} | {runtime} | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} | "
                f"{t['min_ms']:.2f} / {t['max_ms']:.2f} | {per_s:,.0f} | {per_s * (prepared['n_items'] - 1):,.0f} | "
                f"{eager['p50_ms'] / t['p50_ms']:.2f} |"
            )
    lines += ["", "Parity against PyTorch eager on 256 real test histories of 50 items (and the export's own "
              "validation on mixed lengths 1-50, batch sizes 1/7/64), size of model.onnx:", "",
              "| runtime | max abs score diff | top-10 overlap | identical top-10 rows | export validation "
              "(max diff, overlap) | size |", "|---|---|---|---|---|---|"]
    for runtime, run in runs.items():
        p = run["parity"]
        artifact = prepared["artifacts"].get(runtime)
        exported = (f"{artifact['validation']['max_abs_diff']:.2e}, {artifact['validation']['top10_overlap']:.3f}"
                    if artifact else "-")
        size = f"{artifact['size_mb']} MB" if artifact else "-"
        lines.append(f"| {runtime} | {p['max_abs_diff']:.2e} | {p['top10_overlap']:.3f} | "
                     f"{p['top10_identical_rows']:.3f} | {exported} | {size} |")
    lines += ["", *report["targets"]]
    return lines


def targets(report: dict) -> list[str]:
    runs = report["runtimes"]
    key = f"{max(LENGTHS)}x1"
    eager = runs["eager"]["timings"][key]["p50_ms"]
    found = []

    def check(runtime: str, floor: float, overlap: float | None = None) -> None:
        if runtime not in runs:
            return
        ratio = eager / runs[runtime]["timings"][key]["p50_ms"]
        ok = ratio >= floor
        text = f"{runtime} at length {max(LENGTHS)}, batch 1: {ratio:.2f}x eager p50 (target >= {floor}x"
        if overlap is not None:
            measured = runs[runtime]["parity"]["top10_overlap"]
            ok = ok and measured >= overlap
            text += f", top-10 overlap {measured:.3f} >= {overlap}"
        found.append(f"- {text}): {'met' if ok else 'MISSED'}")

    if report["device"] == "cpu":
        check("ort-optimized", 2.0)
        check("ort-int8", 3.5, overlap=0.95)
        big = f"{max(LENGTHS)}x{max(BATCH_SIZES)}"
        for runtime in (r for r in runs if r.startswith("ort-")):
            ratio = runs["eager"]["timings"][big]["p50_ms"] / runs[runtime]["timings"][big]["p50_ms"]
            found.append(f"- {runtime} at length {max(LENGTHS)}, batch {max(BATCH_SIZES)}: {ratio:.2f}x eager p50 "
                         f"(target >= 1.0x): {'met' if ratio >= 1.0 else 'MISSED'}")
    else:
        check("ort-fp16", 2.0)
    return ["Targets:", ""] + found


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LENGTHS), figsize=(6 * len(LENGTHS), 4.5), squeeze=False)
    for ax, length in zip(axes[0], LENGTHS):
        for runtime, run in report["runtimes"].items():
            p50 = [run["timings"][f"{length}x{b}"]["p50_ms"] for b in BATCH_SIZES]
            ax.plot(BATCH_SIZES, p50, marker="o", label=runtime)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("p50 latency per call (ms)")
        ax.set_title(f"length {length}, {report['device']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per shape (at least 10 calls)")
    parser.add_argument("--train-budget", type=float, default=TRAIN_BUDGET_CPU_S, help="CPU seconds of training")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a BERTLoRA checkpoint (ml-100k, MAX_ITEM_LIST_LENGTH 50) to measure instead of training one")
    parser.add_argument("--prepared", type=Path, default=None,
                        help="the JSON a finished prepare step wrote (--child prepare --out FILE): measure its artifacts")
    parser.add_argument("--reuse", action="store_true",
                        help="with --prepared: keep the runtimes an interrupted run already measured")
    parser.add_argument("--openvino-python", default=None,
                        help="interpreter of an environment with onnxruntime-openvino: also measure its OpenVINO EP")
    parser.add_argument("--child", choices=["prepare", *ARTIFACTS, "eager", "eager-bf16", "compile", "ort-openvino"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global LENGTHS, BATCH_SIZES
    LENGTHS, BATCH_SIZES = SHAPES[args.device]
    workdir = SCRATCH / f"inference_{args.device}"
    if args.child == "prepare":
        prepare(args.device, workdir, args.out, args.train_budget, args.checkpoint)
        return
    if args.child:
        measure(args.child, args.device, workdir / "prepared.json", workdir, args.out, args.seconds)
        return

    require_plotting("inference.py")
    from tqdm import tqdm

    workdir.mkdir(parents=True, exist_ok=True)
    script = Path(__file__)
    common = ["--device", args.device, "--seconds", str(args.seconds), "--train-budget", str(args.train_budget)]
    if args.checkpoint:
        common += ["--checkpoint", str(args.checkpoint.resolve())]
    report = {**provenance(), "device": args.device}
    if args.prepared:  # a prepare step that already ran (its artifacts and inputs are in the scratch folder)
        report["prepared"] = json.loads(args.prepared.read_text())
        (workdir / "prepared.json").write_text(json.dumps(report["prepared"]))
    else:
        print("training and exporting ...", flush=True)
        report["prepared"] = run_child(script, [*common, "--child", "prepare", "--out", str(workdir / "prepared.json")],
                                       workdir / "prepared.json", workdir / "prepare.log")
    report["runtimes"] = {}
    runtimes = RUNTIMES[args.device] + (["ort-openvino"] if args.openvino_python else [])
    for runtime in tqdm(runtimes, desc="runtimes", unit="process"):
        out = workdir / f"{runtime}.json"
        if args.reuse and out.exists():  # measured by an interrupted run of the same prepared artifacts
            report["runtimes"][runtime] = json.loads(out.read_text())
            continue
        python = str(Path(args.openvino_python).absolute()) if runtime == "ort-openvino" else None
        report["runtimes"][runtime] = run_child(script, [*common, "--child", runtime, "--out", str(out)],
                                                out, workdir / f"{runtime}.log", python=python)
    reference = np.load(workdir / "probe_eager.npy")
    for runtime, run in report["runtimes"].items():
        run["parity"] = parity(reference, np.load(workdir / f"probe_{runtime}.npy"))
    report["targets"] = targets(report)
    name = f"inference_{args.device}"
    # shorter timings or training than the defaults are smoke runs: keep them out of results/
    complete = args.seconds == parser.get_default("seconds") and (
        args.checkpoint is not None or args.prepared is not None or args.train_budget >= TRAIN_BUDGET_CPU_S)
    folder = RESULTS if complete else workdir
    write_results(name, report, markdown(report), folder)
    plot(report, folder / f"{name}.png")


if __name__ == "__main__":
    main()
