"""Where the int8 time goes, and what other int8 settings give: the figures behind README's int8 paragraph.

    python benchmarks/inference.py        # first: trains, exports and writes scratch/inference_cpu/
    python benchmarks/int8_profile.py     # prints; the committed output is results/int8_profile.md

1. ONNX Runtime's profiler on the optimized fp32 and the int8 artifact, length 50, batch 1, 60 calls:
   kernel time by operator type.
2. Dynamic int8 variants of the same model (per-channel as exported, per-tensor, MatMul-only with
   attention left float, from the unoptimized graph, U8U8): top-10 overlap with PyTorch eager on the 256
   probe rows of inference.py, and p50 latency of 50 calls at batch 1, length 50.
"""

from __future__ import annotations

import collections
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from inference import parity  # noqa: E402

from recbole_llm.export.optimize import scoring_nodes  # noqa: E402

WORK = HERE / "scratch" / "inference_cpu"


def profile(inputs) -> None:
    seq, length = inputs["item_seq_50"][:1], inputs["item_length_50"][:1]
    for name in ("ort-optimized", "ort-int8"):
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(WORK / f"prof_{name}")
        session = ort.InferenceSession(str(WORK / name / "model.onnx"), options, providers=["CPUExecutionProvider"])
        for _ in range(60):
            session.run(["scores"], {"item_seq": seq, "item_length": length})
        by_op = collections.Counter()
        for event in json.load(open(session.end_profiling())):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                by_op[event["args"]["op_name"]] += event["dur"]
        total = sum(by_op.values())
        print(name, "total kernel ms/call", round(total / 60 / 1000, 2))
        for op, duration in by_op.most_common(8):
            print(f"  {op:28s} {100 * duration / total:5.1f}%  {duration / 60 / 1000:.2f} ms/call")


def variants(inputs) -> None:
    optimized, plain = WORK / "ort-optimized" / "model.onnx", WORK / "ort-fp32" / "model.onnx"
    n_items = json.loads((WORK / "prepared.json").read_text())["n_items"]
    reference = np.load(WORK / "probe_eager.npy")
    seq, length = inputs["item_seq_50"][:256], inputs["item_length_50"][:256]
    graph_nodes = [node.name for node in onnx.load(str(optimized), load_external_data=False).graph.node]
    layers = sorted({int(m.group(1)) for m in map(re.compile(r".*layer\.(\d+)\.").match, graph_nodes) if m})
    edge_layers = [n for n in graph_nodes if re.match(rf".*layer\.({layers[0]}|{layers[-1]})\.", n)] if layers else []
    tried = {
        "opt per-channel (exported: QAttention + MatMulInteger)": (optimized, {"per_channel": True}),
        "opt per-tensor": (optimized, {"per_channel": False}),
        "opt MatMul only (attention float)": (optimized, {"per_channel": True, "op_types_to_quantize": ["MatMul"]}),
        "opt per-channel, first and last layer float": (optimized, {"per_channel": True, "exclude": edge_layers}),
        "opt per-channel, reduce_range": (optimized, {"per_channel": True, "reduce_range": True}),
        "plain per-channel": (plain, {"per_channel": True}),
        "plain per-channel U8U8": (plain, {"per_channel": True, "weight_type": QuantType.QUInt8}),
    }
    for name, (source, options) in tried.items():
        out = WORK / "variant.onnx"
        options = dict(options)
        weight_type = options.pop("weight_type", QuantType.QInt8)
        exclude = scoring_nodes(source, n_items) + options.pop("exclude", [])
        quantize_dynamic(str(source), str(out), weight_type=weight_type, nodes_to_exclude=exclude,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}, **options)
        time_and_compare(name, out, reference, seq, length)
    static(plain, n_items, reference, inputs)


def time_and_compare(name: str, path: Path, reference, seq, length) -> None:
    from recbole_llm.serving.sessions import session_options

    session = ort.InferenceSession(str(path), session_options()[0], providers=["CPUExecutionProvider"])
    scores = session.run(["scores"], {"item_seq": seq, "item_length": length})[0]
    one = {"item_seq": seq[:1], "item_length": length[:1]}
    for _ in range(5):
        session.run(["scores"], one)
    latencies = []
    for _ in range(50):
        start = time.perf_counter()
        session.run(["scores"], one)
        latencies.append(time.perf_counter() - start)
    print(f"{name}: {parity(reference, scores)} p50 {1000 * np.median(latencies):.2f} ms", flush=True)


def static(plain: Path, n_items: int, reference, inputs) -> None:
    """Calibrated static int8 (QDQ, per-channel, symmetric) on the plain graph: calibrated on the last 128
    probe histories, compared on the first 128 (held out from calibration)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    seq, length = inputs["item_seq_50"], inputs["item_length_50"]

    class Histories(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(range(128, 256, 16))

        def get_next(self):
            row = next(self.rows, None)
            return None if row is None else {"item_seq": seq[row : row + 16], "item_length": length[row : row + 16]}

    out = WORK / "variant_static.onnx"
    try:
        quantize_static(str(plain), str(out), Histories(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                        nodes_to_exclude=scoring_nodes(plain, n_items),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    except Exception as error:  # noqa: BLE001 - report and go on
        print(f"static QDQ: failed ({str(error).splitlines()[0][:200]})")
        return
    time_and_compare("static QDQ per-channel, MatMul (first 128 rows)", out, reference[:128], seq[:128], length[:128])


def main() -> None:
    if not (WORK / "prepared.json").is_file():
        raise SystemExit("int8_profile.py: error: run benchmarks/inference.py first")
    inputs = np.load(WORK / "inputs.npz")
    profile(inputs)
    variants(inputs)


if __name__ == "__main__":
    main()
