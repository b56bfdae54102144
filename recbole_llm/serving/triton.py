"""Triton Inference Server over an exported artifact: ``recbole-llm serve ARTIFACT --engine triton``.

PyTriton (``pip install "recbole_llm[triton]"``: nvidia-pytriton) carries a real ``tritonserver`` with Triton's
Python backend; it needs neither Docker nor a GPU. The artifact is loaded here by the project's runtime
(:class:`~recbole_llm.serving.runtime.Recommender`, ONNX Runtime and numpy) and bound to Triton as the model
``recommend``, with Triton's dynamic batching on; Triton answers KServe v2 requests over HTTP and gRPC and
serves its own health, readiness, model metadata and Prometheus metrics. PyTriton is imported only here, and
only when a server starts, so everything else works without it.

The model's tensors (Triton's batch dimension first: one row per history, at most ``--max-batch`` rows per
request and per model call)::

    inputs   histories       BYTES [rows, n]  raw item tokens, UTF-8, oldest first; a tensor is rectangular, so
                                              shorter histories end in empty strings (padding: "" is never an item)
             k               INT32 [rows, 1]  optional: items per answer (default 10, as the HTTP service)
             exclude_seen    BOOL  [rows, 1]  optional: drop the history's items (default: the artifact's)
    outputs  items           BYTES [rows, K]  the top raw item tokens, best first; K is the request's largest k,
                                              and a row with fewer items (its k is smaller, or fewer were left
                                              after exclusions) ends in empty strings
             scores          FP32  [rows, K]  their scores; -inf beside an empty string
             unknown_tokens  INT32 [rows, 1]  tokens of the history the model does not know (skipped)

Requests are checked by the HTTP service's own functions (:func:`~recbole_llm.serving.requests.check_histories`,
:func:`~recbole_llm.serving.requests.make_job`: the same bounds on batch, history length and k, the same
messages); Triton itself refuses a wrong dtype, a wrong shape or a batch over ``--max-batch``.

Batching: Triton's dynamic batcher gives the bound function every request waiting when the model is free
(no added delay), as the HTTP service's batcher does; the function answers them all with one
:meth:`~recbole_llm.serving.runtime.Recommender.rank` call, which takes k and exclude_seen per row, so no
request is split by its k (PyTriton's ``@batch`` would concatenate the requests, which needs one history
width; ``@group_by_values`` would run one model call per distinct k). Each request gets back its own rows.
Triton batches together only requests whose tensors have the same shape beyond the batch dimension, and
PyTriton 0.7 cannot mark an input ragged: clients that pad histories to one width (e.g. 50) share calls most.

Errors: PyTriton answers errors per model call, not per request, so a bad request (unknown tokens under
``--unknown-tokens error``, k out of range, an empty history, a history over ``--max-history``) fails the
requests Triton batched with it too; its error message names the problem in one line, inside PyTriton's
traceback text. The server keeps answering.

The Python backend's stub process loads the interpreter's shared libpython by name; an interpreter built
outside the system (pyenv, a source build) would get the system's library of another patch release, and
model loading fails (``'_thread.RLock' object has no attribute '_recursion_count'``). :func:`server_environment`
puts this interpreter's own library folder first on the server's ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import sysconfig
import threading
from collections.abc import MutableMapping, Sequence
from pathlib import Path

import numpy as np

from recbole_llm.errors import RecboleLLMError, first_line, shown
from recbole_llm.serving.records import Encoded, Recommendation
from recbole_llm.serving.requests import DEFAULT_K, Limits, RequestError, check_histories, make_job
from recbole_llm.serving.runtime import UNKNOWN_TOKEN_POLICIES, Recommender
from recbole_llm.serving.server import check_can_listen

MODEL_NAME = "recommend"
INPUTS = ("histories", "k", "exclude_seen")
OUTPUTS = ("items", "scores", "unknown_tokens")
PADDING = b""  # pads histories in and answers out; never an item token
# folders the dynamic loader searches without being told: a libpython there is the one the stub finds anyway
SYSTEM_LIBRARY_FOLDERS = {"/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"}
INSTALL = "pip install 'recbole_llm[triton]' (nvidia-pytriton: Linux x86_64 or arm64 with glibc 2.35 or newer)"


def require_pytriton() -> None:
    """Raises RecboleLLMError in one line, naming the install, where PyTriton cannot be imported."""
    import importlib

    try:
        importlib.import_module("pytriton.triton")
    except ImportError as error:
        raise RecboleLLMError(f"--engine triton needs PyTriton ({first_line(error)}): {INSTALL}") from None


def python_library_folder() -> str | None:
    """The folder of this interpreter's shared libpython where the dynamic loader would not find it by itself
    (pyenv, a source build, conda); None for a system interpreter or one without a shared libpython."""
    folder, name = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not (sysconfig.get_config_var("Py_ENABLE_SHARED") and folder and name):
        return None
    multiarch = sysconfig.get_config_var("MULTIARCH")
    system = SYSTEM_LIBRARY_FOLDERS | ({f"/lib/{multiarch}", f"/usr/lib/{multiarch}"} if multiarch else set())
    if os.path.realpath(folder) in {os.path.realpath(path) for path in system}:
        return None
    return folder if os.path.isfile(os.path.join(folder, name)) else None


def server_environment(environ: MutableMapping[str, str]) -> str | None:
    """Put :func:`python_library_folder` first on ``environ``'s ``LD_LIBRARY_PATH`` (PyTriton starts
    tritonserver, and Triton the Python backend's stub, with this process's environment); returns the folder
    added, or None where nothing was needed."""
    folder = python_library_folder()
    if folder is None:
        return None
    paths = [path for path in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if path]
    if paths[:1] != [folder]:
        environ["LD_LIBRARY_PATH"] = os.pathsep.join([folder, *[path for path in paths if path != folder]])
    return folder


class TritonRecommender:
    """The callable PyTriton binds: a list of Triton requests (``{input name: numpy array}``) in, one answer
    (``{output name: numpy array}``) per request out, all rows in one model call."""

    def __init__(self, recommender: Recommender, limits: Limits):
        self.recommender = recommender
        self.limits = limits
        self.calls = 0  # model calls so far (Triton's statistics count its own executions too)

    def job(self, request) -> object:
        """One request's rows as a :class:`~recbole_llm.serving.batching.Job`; RequestError naming the problem."""
        histories = request["histories"]
        rows = len(histories)
        decoded = [self._history(row, values) for row, values in enumerate(histories)]
        check_histories(decoded, self.limits)
        ks = [int(k) for k in request["k"].reshape(rows)] if "k" in request else [DEFAULT_K] * rows
        if "exclude_seen" in request:
            seen = [bool(value) for value in request["exclude_seen"].reshape(rows)]
        else:
            seen = [bool(self.recommender.exclude_seen)] * rows
        return make_job(decoded, ks, seen, False, self.recommender, self.limits)

    @staticmethod
    def _history(row: int, values: np.ndarray) -> list[str]:
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

    def __call__(self, requests: Sequence) -> list[dict[str, np.ndarray]]:
        """Every request waiting, answered in one model call. Raises RecboleLLMError for the first bad request
        (PyTriton then fails the whole call: errors are per call)."""
        jobs = []
        for request in requests:
            try:
                jobs.append(self.job(request))
            except RequestError as refused:
                raise RecboleLLMError(str(refused)) from None
        answers = self.recommender.rank(Encoded.join([job.encoded for job in jobs]),
                                        [k for job in jobs for k in job.ks],
                                        [e for job in jobs for e in job.exclude])
        self.calls += 1
        responses, start = [], 0
        for job in jobs:
            responses.append(tensors(answers[start : start + len(job.ks)], max(job.ks)))
            start += len(job.ks)
        return responses


def tensors(answers: Sequence[Recommendation], width: int) -> dict[str, np.ndarray]:
    """One request's answers as its output tensors: items BYTES and scores FP32 [rows, width], padded with
    empty strings and -inf; unknown_tokens INT32 [rows, 1]."""
    items = np.full((len(answers), width), PADDING, dtype=object)
    scores = np.full((len(answers), width), -np.inf, dtype=np.float32)
    for row, answer in enumerate(answers):
        items[row, : len(answer.items)] = [token.encode("utf-8") for token in answer.items]
        scores[row, : len(answer.scores)] = answer.scores
    unknown = np.array([[answer.unknown_tokens] for answer in answers], dtype=np.int32).reshape(len(answers), 1)
    return {"items": items, "scores": scores, "unknown_tokens": unknown}


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Each of ``ports`` ({option: port}) a TCP port, no two alike, and free on ``host``; RecboleLLMError."""
    for option, port in ports.items():
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise RecboleLLMError(f"{option} {port!r} is not a TCP port; use 1 to 65535")
    options = list(ports)
    for index, option in enumerate(options):
        for other in options[index + 1 :]:
            if ports[option] == ports[other]:
                raise RecboleLLMError(f"{option} and {other} are both {ports[option]}; Triton needs a port for each")
    for option, port in ports.items():
        check_can_listen(host, port)


def serve_triton(
    artifact: str | Path,
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    limits: Limits | None = None,
    unknown_tokens: str = "skip",
    intra_op_threads: int | None = None,
    retrieval: str = "exact",
) -> None:
    """Serve ``artifact`` with Triton until SIGTERM or SIGINT (then Triton drains for up to
    ``limits.shutdown_timeout`` seconds, stops, and this returns). Raises RecboleLLMError in one line, with
    nothing left running, for missing PyTriton, a port that is taken or given twice, an artifact that does not
    load, or a server that does not start or stops by itself."""
    limits = limits or Limits()
    limits.check()
    if unknown_tokens not in UNKNOWN_TOKEN_POLICIES:
        raise RecboleLLMError(f"--unknown-tokens '{unknown_tokens}' is not a policy; use skip or error")
    require_pytriton()
    check_ports(host, {"--port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port})
    recommender = Recommender(artifact, unknown_tokens=unknown_tokens, intra_op_threads=intra_op_threads,
                              retrieval=retrieval)
    added = server_environment(os.environ)

    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(
        http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
        metrics_address=host, metrics_port=metrics_port, allow_gpu_metrics=False,
        exit_timeout_secs=max(1, math.ceil(limits.shutdown_timeout)), strict_readiness=True, exit_on_error=True,
    )
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    triton = Triton(config=config)
    try:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=TritonRecommender(recommender, limits),
            inputs=[Tensor(name="histories", dtype=np.bytes_, shape=(-1,)),
                    Tensor(name="k", dtype=np.int32, shape=(1,), optional=True),
                    Tensor(name="exclude_seen", dtype=np.bool_, shape=(1,), optional=True)],
            outputs=[Tensor(name="items", dtype=np.bytes_, shape=(-1,)),
                     Tensor(name="scores", dtype=np.float32, shape=(-1,)),
                     Tensor(name="unknown_tokens", dtype=np.int32, shape=(1,))],
            config=ModelConfig(max_batch_size=limits.max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=0)),
            strict=True,
        )
        try:
            triton.run()  # starts tritonserver, loads the model, waits until it is ready
        except Exception as error:  # noqa: BLE001 - PyTriton's and the client's errors share no base
            hint = ("" if added else "; if Triton's log says '_recursion_count', the Python backend loaded another "
                    "libpython: put this interpreter's lib folder (python -c \"import sysconfig; "
                    "print(sysconfig.get_config_var('LIBDIR'))\") on LD_LIBRARY_PATH")
            raise RecboleLLMError(f"Triton did not start serving '{artifact}' ({first_line(error)}){hint}") from None
        if stop.is_set():
            return
        providers = ", ".join(recommender.session.get_providers())
        print(f"recbole-llm serve: {artifact} on Triton as model '{MODEL_NAME}' ({providers}): HTTP {host}:{http_port}, "
              f"gRPC {host}:{grpc_port}, metrics http://{host}:{metrics_port}/metrics; SIGINT or SIGTERM stops it",
              file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            if not triton.is_alive():
                raise RecboleLLMError("Triton stopped by itself (its server or the Python backend exited); "
                                      "start it again")
    finally:
        triton.stop()  # stops tritonserver (its stub with it) and removes PyTriton's workspace
