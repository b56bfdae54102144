"""An HTTP JSON service over an exported artifact: ``recbole-llm serve ARTIFACT``.

    POST /recommend   {"histories": [["242", "302"], ["51"]], "k": 10, "exclude_seen": true}
                   -> {"recommendations": [{"items": [...], "scores": [...], "unknown_tokens": 0}, ...]}
    GET  /health      {"status": "ok"}
    GET  /metadata    the artifact's metadata.json (without its item list) and the service's limits

FastAPI on uvicorn (``pip install "recbole_llm[serve]"``); the model runs in ``recbole_llm.runtime``
(ONNX Runtime and numpy, no torch or RecBole). Binds 127.0.0.1 unless told otherwise. Requests are read
and checked by hand rather than by a pydantic model, so that every refusal is one line naming the problem:
400 for a body that is not JSON, 413 for a body, batch or history over the limits, 422 for well-formed
JSON with a wrong field, type or value. A refused request never reaches the model.

Batching: one worker owns the ONNX Runtime session. When it is free it takes every request waiting (up to
``max_batch`` histories) and answers them with one call, so requests that arrive together share a call
and a lone request waits for nobody. ``--no-batching`` runs one call per request (the load test compares).
"""


# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recbole_llm.errors import RecboleLLMError
from recbole_llm.runtime import UNKNOWN_TOKEN_POLICIES, Recommender

FIELDS = {"histories", "k", "exclude_seen"}


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20  # 1 MiB
    max_batch: int = 256  # histories per request, and per ONNX Runtime call
    max_history: int = 10_000  # tokens per history (only the model's max_length most recent are used)


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    item_seq: np.ndarray
    item_length: np.ndarray
    ks: list[int]
    exclude: list[bool]
    unknown: list[int]


def parse_request(body: bytes, recommender: Recommender, limits: Limits) -> Job:
    """The request body, checked and encoded; raises RequestError naming the first problem."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(400, f"body is not valid JSON ({error}); send a JSON object") from None
    if not isinstance(payload, dict):
        raise RequestError(422, 'body must be a JSON object like {"histories": [["242", "302"]], "k": 10}')
    unknown_fields = sorted(set(payload) - FIELDS)
    if unknown_fields:
        raise RequestError(422, f"unknown field '{unknown_fields[0]}'; the fields are histories, k, exclude_seen")
    if "histories" not in payload:
        raise RequestError(422, "missing field 'histories': a list of histories, each a list of item tokens")
    histories = payload["histories"]
    k = payload.get("k", 10)
    exclude_seen = payload.get("exclude_seen", True)
    if not isinstance(histories, list) or not histories:
        raise RequestError(422, "'histories' must be a non-empty list of histories (lists of item tokens)")
    if len(histories) > limits.max_batch:
        raise RequestError(413, f"{len(histories)} histories in one request; the limit is {limits.max_batch}")
    for row, history in enumerate(histories):
        if not isinstance(history, list):
            raise RequestError(422, f"history {row} must be a list of item tokens, not {type(history).__name__}")
        if len(history) > limits.max_history:
            raise RequestError(413, f"history {row} has {len(history)} items; the limit is {limits.max_history}")
        for position, token in enumerate(history):
            if isinstance(token, bool) or not isinstance(token, (str, int)):
                raise RequestError(
                    422, f"history {row}, position {position}: item tokens must be strings or integers, "
                    f"not {type(token).__name__}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise RequestError(422, f"'k' must be an integer, not {type(k).__name__}")
    if not isinstance(exclude_seen, bool):
        raise RequestError(422, f"'exclude_seen' must be true or false, not {type(exclude_seen).__name__}")
    try:
        recommender.check_k(k)
        item_seq, item_length, unknown = recommender.encode(histories)  # it maps int tokens by str()
    except RecboleLLMError as error:
        raise RequestError(422, str(error)) from None
    rows = len(histories)
    return Job(item_seq, item_length, [k] * rows, [exclude_seen] * rows, unknown)


class Batcher:
    """One worker thread runs the model; requests waiting when it is free share one call."""

    def __init__(self, recommender: Recommender, max_rows: int, batching: bool):
        self.recommender = recommender
        self.max_rows = max_rows
        self.batching = batching
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.calls = 0
        self.rows = 0

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.worker = asyncio.create_task(self._work())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
        self.executor.shutdown(wait=False)

    async def submit(self, job: Job) -> list:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((job, future))
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        carried = None
        while True:
            first = carried or await self.queue.get()
            carried = None
            batch, rows = [first], len(first[0].ks)
            while self.batching and not self.queue.empty():
                waiting = self.queue.get_nowait()
                if rows + len(waiting[0].ks) > self.max_rows:
                    carried = waiting  # first in the next call
                    break
                batch.append(waiting)
                rows += len(waiting[0].ks)
            jobs = [job for job, _ in batch]
            try:
                answers = await loop.run_in_executor(self.executor, self._run, jobs)
            except Exception as error:  # the model failed: every request of this call gets a 500
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.calls += 1
            self.rows += rows
            start = 0
            for job, future in batch:
                if not future.done():  # a client that went away leaves a cancelled future
                    future.set_result(answers[start : start + len(job.ks)])
                start += len(job.ks)

    def _run(self, jobs: list[Job]) -> list:
        return self.recommender.rank(
            np.concatenate([job.item_seq for job in jobs]),
            np.concatenate([job.item_length for job in jobs]),
            [k for job in jobs for k in job.ks],
            [e for job in jobs for e in job.exclude],
            [u for job in jobs for u in job.unknown],
        )


def _require_serving_extra() -> None:
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise RecboleLLMError(f"serving needs {' and '.join(missing)}: pip install 'recbole_llm[serve]'")


def create_app(
    artifact: str | Path,
    limits: Limits | None = None,
    unknown_tokens: str = "skip",
    batching: bool = True,
    intra_op_threads: int | None = None,
):
    """The FastAPI application serving ``artifact``."""
    from contextlib import asynccontextmanager

    _require_serving_extra()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    limits = limits or Limits()
    recommender = Recommender(artifact, unknown_tokens=unknown_tokens, intra_op_threads=intra_op_threads)
    batcher = Batcher(recommender, limits.max_batch, batching)
    public_metadata = {key: value for key, value in recommender.metadata.items() if key != "item_tokens"}
    public_metadata["n_item_tokens"] = len(recommender.tokens) - 1
    public_metadata["service"] = {**asdict(limits), "unknown_tokens": unknown_tokens, "batching": batching,
                                  "max_k": recommender.max_k,
                                  "providers": recommender.session.get_providers()}

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="recbole_llm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise RequestError(413, f"body of {declared} bytes; the limit is {limits.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise RequestError(413, f"body over {limits.max_body_bytes} bytes; the limit is {limits.max_body_bytes}")
        return bytes(body)

    @app.post("/recommend")
    async def recommend(request: Request):
        try:
            job = parse_request(await read_body(request), recommender, limits)
        except RequestError as refused:
            return error(refused.status, str(refused))
        try:
            answers = await batcher.submit(job)
        except Exception as failure:  # noqa: BLE001 - the service stays up and says what failed
            return error(500, f"the model failed on this request: {type(failure).__name__}: {failure}")
        return {"recommendations": [asdict(answer) for answer in answers]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        return {**public_metadata, "model_calls": batcher.calls, "rows_scored": batcher.rows}

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return error(404, f"no route {request.method} {request.url.path}; use POST /recommend, GET /health, "
                          "GET /metadata")

    @app.exception_handler(405)
    async def wrong_method(request: Request, exc):
        return error(405, f"{request.method} is not allowed on {request.url.path}")

    return app


def serve(
    artifact: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    unknown_tokens: str = "skip",
    batching: bool = True,
    intra_op_threads: int | None = None,
) -> None:
    """Run the service until interrupted."""
    _require_serving_extra()
    import uvicorn

    if unknown_tokens not in UNKNOWN_TOKEN_POLICIES:
        raise RecboleLLMError(f"--unknown-tokens '{unknown_tokens}' is not a policy; use skip or error")
    app = create_app(artifact, limits, unknown_tokens, batching, intra_op_threads)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
