"""ONNX Runtime's graph transforms on an exported graph: transformer fusions, int8 quantization, fp16.

Each rewrites ``path`` in place; :mod:`recbole_llm.export.pipeline` validates again after each.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from recbole_llm.errors import RecboleLLMError


def optimize(path: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """ONNX Runtime's transformer fusions (Attention, SkipLayerNorm, BiasGelu, ...) for BERT-style graphs;
    returns the fused-operator counts. ``num_heads``/``hidden_size`` 0: detected from the graph."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet_onnxruntime_tools():
        optimized = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                   opt_level=1, use_gpu=False)
        counts = {name: int(count) for name, count in optimized.get_fused_operator_statistics().items() if count}
        optimized.save_model_to_file(str(path))
    return counts


def scoring_nodes(path: Path, n_items: int) -> list[str]:
    """The MatMul/Gemm nodes that score every item: their weight is a 2-D table with a dimension of
    ``n_items``, held as an initializer or (before optimization folds it) a Constant node."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    tables = [(init.name, list(init.dims)) for init in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                tables.append((node.output[0], list(value.dims)))
    item_tables = {name for name, dims in tables if len(dims) == 2 and n_items in dims}
    return [
        node.name for node in model.graph.node
        if node.op_type in ("MatMul", "Gemm") and any(name in item_tables for name in node.input)
    ]


QUANTIZED_OPERATORS = ("QAttention", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm")


def quantize_int8(path: Path, n_items: int) -> dict[str, int]:
    """Dynamic int8 quantization of the encoder's weights (per channel), activations quantized at run time.

    The final product with the item table stays in float: it ranks every item, and quantizing it costs
    most of the top-10 overlap for a few percent of the compute. Fused ``Attention`` (``optimize`` first)
    becomes ONNX Runtime's ``QAttention``. Returns the counts of integer operators in the result.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_name(path.stem + ".int8.onnx")
    try:
        with _quiet_onnxruntime_tools():
            # Fused contrib operators have no ONNX type inference: tell the quantizer their outputs are float.
            quantize_dynamic(
                str(path), str(quantized), weight_type=QuantType.QInt8, per_channel=True,
                nodes_to_exclude=scoring_nodes(path, n_items),
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
    except (RuntimeError, ValueError) as error:
        raise RecboleLLMError(f"int8 quantization failed: {str(error).splitlines()[0]}") from None
    os.replace(quantized, path)
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type in QUANTIZED_OPERATORS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def convert_fp16(path: Path) -> None:
    """fp16 weights and activations, fp32 inputs and outputs (for the CUDA provider)."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    with _quiet_onnxruntime_tools():
        model = OnnxModel(onnx.load(str(path)))
        model.convert_float_to_float16(keep_io_types=True)
        model.save_model_to_file(str(path))


class _quiet_onnxruntime_tools:
    """ONNX Runtime's optimizer and quantizer log hundreds of INFO lines (and advice such as "consider
    pre-processing") through Python logging, and their sessions log through ONNX Runtime's own logger; the
    export reports what matters (fused operators, what was quantized, parity figures) itself. Errors still
    surface as exceptions."""

    def __enter__(self) -> None:
        import onnxruntime as ort

        self._levels = {}
        for name in ("onnxruntime", "onnxruntime.transformers", "onnxruntime.quantization", ""):
            logger = logging.getLogger(name or None)  # "": the root logger, which the quantizer uses
            self._levels[name] = logger.level
            logger.setLevel(max(logger.level, logging.ERROR))
        ort.set_default_logger_severity(3)  # errors only

    def __exit__(self, *exc) -> None:
        import onnxruntime as ort

        for name, level in self._levels.items():
            logging.getLogger(name or None).setLevel(level)
        ort.set_default_logger_severity(2)  # ONNX Runtime's default: warnings
