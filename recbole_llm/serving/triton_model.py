"""The model inside Triton's Python backend: each request checked on its own, every good
request's rows ranked in one model call, each bad request answered with its own one-line error.

Triton's Python backend runs ``recommend/1/model.py`` in its stub process; that file (written by
:mod:`~recbole_llm.serving.triton`) only hands Triton's utilities module to :class:`RecommendModel`, so the
logic lives here and :func:`answer` is testable without Triton.

The tensors (Triton's batch dimension first: one row per history)::

    inputs   histories       BYTES [rows, n]  raw item tokens, UTF-8, oldest first; a request's tensor is
                                              rectangular, so its shorter histories end in empty strings
                                              (padding: "" is never an item). Requests of different widths
                                              share a model call (the input is ragged), so no client needs
                                              to pad to a width agreed with the others
             k               INT32 [rows, 1]  optional: items per answer (default 10, as the HTTP service)
             exclude_seen    BOOL  [rows, 1]  optional: drop the history's items (default: the artifact's)
    outputs  items           BYTES [rows, K]  the top raw item tokens, best first; K is the request's largest
                                              k, and a row with fewer items (its k is smaller, or fewer were
                                              left after exclusions) ends in empty strings
             scores          FP32  [rows, K]  their scores; -inf beside an empty string
             unknown_tokens  INT32 [rows, 1]  tokens of the history the model does not know (skipped)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from recbole_llm.errors import first_line, shown
from recbole_llm.serving.batching import Job
from recbole_llm.serving.records import Encoded, Recommendation
from recbole_llm.serving.requests import DEFAULT_K, Limits, RequestError, check_histories, make_job
from recbole_llm.serving.runtime import Recommender

INPUTS = ("histories", "k", "exclude_seen")
OUTPUTS = ("items", "scores", "unknown_tokens")
PADDING = b""  # pads histories in and answers out; never an item token
# config.pbtxt's parameters (strings): what recommend/1/model.py needs to load the artifact as the command did
PARAMETERS = ("artifact", "unknown_tokens", "intra_op_threads", "retrieval", "max_batch", "max_history")


def decode_history(row: int, values: np.ndarray) -> list[str]:
    """One row of a histories tensor (bytes) as item tokens, padding dropped; RequestError 422 for a token
    that is not UTF-8."""
    tokens = []
    for position, value in enumerate(values):
        raw = bytes(value)
        if raw == PADDING:
            continue
        try:
            tokens.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError(422, f"history {row}, position {position}: item token {shown(repr(raw))} is not "
                                    "UTF-8; send item tokens as UTF-8 bytes") from None
    return tokens


def make_request_job(request: Mapping[str, np.ndarray], recommender: Recommender, limits: Limits) -> Job:
    """One request's tensors (``{input name: array}``, histories [rows, n] and optional k, exclude_seen
    [rows, 1]) as a :class:`~recbole_llm.serving.batching.Job`, checked by the HTTP service's own functions
    (the same bounds and messages); raises RequestError naming the first problem."""
    histories = request["histories"]
    rows = len(histories)
    decoded = [decode_history(row, values) for row, values in enumerate(histories)]
    check_histories(decoded, limits)
    ks = [int(k) for k in request["k"].reshape(rows)] if "k" in request else [DEFAULT_K] * rows
    if "exclude_seen" in request:
        seen = [bool(value) for value in request["exclude_seen"].reshape(rows)]
    else:
        seen = [bool(recommender.exclude_seen)] * rows
    return make_job(decoded, ks, seen, False, recommender, limits)


def answer(requests: Sequence[Mapping[str, np.ndarray]], recommender: Recommender,
           limits: Limits) -> list[dict[str, np.ndarray] | RequestError]:
    """What Triton's ``execute`` returns, per request and in order: the output tensors (:func:`tensors`) of
    each good request, all ranked in one :meth:`~recbole_llm.serving.runtime.Recommender.rank` call (k and
    exclude_seen per row), or the RequestError of each bad one, which fails that request alone."""
    results: list[Job | RequestError] = []
    for request in requests:
        try:
            results.append(make_request_job(request, recommender, limits))
        except RequestError as refused:
            results.append(refused)
    jobs = [job for job in results if isinstance(job, Job)]
    if not jobs:
        return results  # type: ignore[return-value]  # every one an error
    answers = iter(recommender.rank(Encoded.join([job.encoded for job in jobs]),
                                    [k for job in jobs for k in job.ks], [e for job in jobs for e in job.exclude]))
    return [job if isinstance(job, RequestError) else tensors([next(answers) for _ in job.ks], max(job.ks))
            for job in results]


def tensors(answers: Sequence[Recommendation], width: int) -> dict[str, np.ndarray]:
    """One request's answers as its output tensors: items BYTES and scores FP32 [rows, width], padded with
    empty strings and -inf; unknown_tokens INT32 [rows, 1]."""
    items = np.full((len(answers), width), PADDING, dtype=object)
    scores = np.full((len(answers), width), -np.inf, dtype=np.float32)
    for row, recommendation in enumerate(answers):
        items[row, : len(recommendation.items)] = [token.encode("utf-8") for token in recommendation.items]
        scores[row, : len(recommendation.scores)] = recommendation.scores
    unknown = np.array([[a.unknown_tokens] for a in answers], dtype=np.int32).reshape(len(answers), 1)
    return {"items": items, "scores": scores, "unknown_tokens": unknown}


class RecommendModel:
    """Triton's ``TritonPythonModel`` for the artifact named in the model's config.pbtxt parameters.
    ``utils`` is Triton's ``triton_python_backend_utils`` module, which exists only in the backend's stub
    process: the generated model.py sets it on a subclass."""

    utils: Any = None

    def initialize(self, args: dict[str, str]) -> None:
        """Load the artifact (Triton calls this once, when it loads the model); RecboleLLMError fails the load."""
        parameters = json.loads(args["model_config"])["parameters"]
        options = {name: parameters[name]["string_value"] for name in PARAMETERS}
        threads = options["intra_op_threads"]
        self.recommender = Recommender(options["artifact"], unknown_tokens=options["unknown_tokens"],
                                       intra_op_threads=int(threads) if threads else None,
                                       retrieval=options["retrieval"])
        self.limits = Limits(max_batch=int(options["max_batch"]), max_history=int(options["max_history"]))

    def execute(self, requests: list) -> list:
        """One ``InferenceResponse`` per Triton request, in order: its outputs, or its own one-line error."""
        pb = self.utils
        inputs = [{name: tensor.as_numpy() for name in INPUTS
                   if (tensor := pb.get_input_tensor_by_name(request, name)) is not None} for request in requests]
        try:
            results = answer(inputs, self.recommender, self.limits)
        except Exception as error:  # noqa: BLE001 - the model failed: every request of the call says so, in one line
            message = f"the model failed on this batch ({type(error).__name__}: {first_line(error)}); try again"
            return [pb.InferenceResponse(error=pb.TritonError(message, pb.TritonError.INTERNAL)) for _ in requests]
        return [pb.InferenceResponse(error=pb.TritonError(str(result), pb.TritonError.INVALID_ARG))
                if isinstance(result, RequestError) else
                pb.InferenceResponse(output_tensors=[pb.Tensor(name, result[name]) for name in OUTPUTS])
                for result in results]
