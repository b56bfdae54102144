"""An HTTP JSON service over an exported artifact: ``recbole-llm serve ARTIFACT``.

    POST /recommend   {"histories": [["242", "302"], ["51"]], "k": 10, "exclude_seen": true, "explain": false}
                      (exclude_seen left out: the artifact's default, metadata.json's exclude_seen)
                   -> {"recommendations": [{"items": [...], "scores": [...], "unknown_tokens": 0}, ...]}
                      (with "explain": true, each answer also has "explanations": for each recommended item,
                      [{"item": history token, "effect": score change without it}, ...], largest first)
    POST /items       {"items": {"1683": "Toy Story 3 (2010), Animation Children"}}   (only with --allow-item-updates,
                      on an artifact exported with --item-index: new items from their text, recommended at once)
                   -> {"added": ["1683"], "n_item_tokens": 1683}   (kept in memory: recbole-llm add-items writes
                      an artifact; 403 when off, 409 for a token already there, 413 over --max-new-items, 422)
    GET  /health      {"status": "ok"}
    GET  /metadata    the artifact's metadata.json (without its item list) and the service's limits

FastAPI on uvicorn (``pip install "recbole_llm[serve]"``); the model runs in ``recbole_llm.serving.runtime``
(ONNX Runtime and numpy, no torch or RecBole). Binds 127.0.0.1 unless told otherwise. Requests are read
and checked by hand rather than by a pydantic model, so that every refusal is one line naming the problem:
400 for a body that is not JSON (or not UTF-8, or nested deeper than any request is), 408 for a body that
does not arrive within ``body_timeout``, 413 for a body, batch or history over the limits or an explained
request costing more than ``max_explained`` model rows (each history, and it without each item read) or
``EFFECTS_PER_ROW`` times as many effects in its answer (k x items read, per history), 422 for
well-formed JSON with a wrong field, type or value (an integer of more than 20 digits, a string with a lone
surrogate). A refused request never reaches the model.

Time is bounded for every client: a request's head and body must each arrive within ``body_timeout``
seconds, and a client that takes none of its answer for as long is dropped; an idle connection is closed
after ``keep_alive_timeout``. On SIGTERM or SIGINT the service stops accepting connections, answers body reads
still in flight with 503, lets model calls finish for up to ``shutdown_timeout`` seconds, and exits. A
client that goes away mid-request costs one log line, not a traceback.

Batching: one worker owns the ONNX Runtime session. When it is free it takes every request waiting (up to
``max_batch`` histories) and answers them with one call, so requests that arrive together share a call
and a lone request waits for nobody. ``--no-batching`` runs one call per request (the load test compares).
"""


# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import json
import logging
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recbole_llm.errors import RecboleLLMError
from recbole_llm.artifact.contract import ArtifactError, shown
from recbole_llm.serving.runtime import UNKNOWN_TOKEN_POLICIES, Encoded, Recommender, valid_unicode

FIELDS = {"histories", "k", "exclude_seen", "explain"}
MAX_DEPTH = 8  # arrays and objects nested in a body; a request nests 3: {"histories": [["242", ...]]}
MAX_INT_DIGITS = 20  # an integer item token or k: 64-bit ids fit, longer ones are sent as strings
EFFECTS_PER_ROW = 100  # effects an explained answer may report per model row --max-explained allows (k <= 100
# on average over the items read): the answer's size, bounded by the same flag
log = logging.getLogger("uvicorn.error")  # uvicorn formats it: one line per event


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20  # 1 MiB
    max_batch: int = 256  # histories per request, and per ONNX Runtime call
    max_history: int = 10_000  # tokens per history (only the model's max_length most recent are used)
    # model rows one explained request may cost (Recommender.explain_rows): each history, and it once without
    # each item the model reads; and, per row allowed, EFFECTS_PER_ROW effects in its answer (k x items read,
    # per history). benchmarks/explain_bound.py measures the worst request within it; unbounded, one request
    # held the service for two minutes and 15 GB
    max_explained: int = 256
    max_new_items: int = 1000  # items one POST /items may add (each runs through the text tower)
    body_timeout: float = 10.0  # seconds for a request's head, and its body, to arrive; and to take some answer
    keep_alive_timeout: float = 5.0  # seconds an idle connection stays open
    shutdown_timeout: float = 10.0  # seconds requests in flight may take to finish once told to stop

    def check(self) -> None:
        """Raises RecboleLLMError naming the first limit out of range."""
        for name in ("max_body_bytes", "max_batch", "max_history", "max_explained", "max_new_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecboleLLMError(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}")
        for name in ("body_timeout", "keep_alive_timeout", "shutdown_timeout"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not 0 < value <= 86_400):
                raise RecboleLLMError(f"--{name.replace('_', '-')} must be a number of seconds above 0 and at most "
                                      f"86400, not {value!r}")


class RequestError(Exception):
    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status = status
        self.close = close  # the body may be unread: the connection cannot carry another request


class ClientGone(Exception):
    """The client closed its connection before its request was read."""


def json_depth(body: bytes) -> int:
    """How deep arrays and objects nest in UTF-8 ``body``, not counting brackets inside strings. On any prefix
    of valid JSON it is the depth a parser reaches, so it bounds the parser's recursion. Linear, in numpy."""
    data = np.frombuffer(body, dtype=np.uint8)
    if not data.size:
        return 0
    index = np.arange(data.size)
    last_other = np.maximum.accumulate(np.where(data == 0x5C, -1, index))  # last byte that is not a backslash
    backslashes_before = index - 1 - np.concatenate(([-1], last_other[:-1]))
    quotes = (data == 0x22) & (backslashes_before % 2 == 0)  # quotes not escaped
    step = _BRACKET_STEP[data]
    step[np.cumsum(quotes) % 2 == 1] = 0  # inside a string (UTF-8 keeps these ASCII bytes out of multi-byte characters)
    return int(np.cumsum(step, dtype=np.int64).max(initial=0))


_BRACKET_STEP = np.zeros(256, dtype=np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise RequestError(422, f"an integer of {digits} digits; integers (item tokens, k) have at most "
                                f"{MAX_INT_DIGITS}: send longer item ids as strings")
    return int(text)


def _no_twice(pairs: list) -> dict:
    """A JSON object, refused when it names a key twice (JSON keeps the last silently: an ambiguous request)."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise RequestError(422, f"key '{shown(key)}' appears twice in one JSON object; give each key once")
        seen[key] = value
    return seen


def _no_constant(name: str):
    raise RequestError(400, f"body is not valid JSON ({name} is not a JSON value); send a JSON object")


@dataclass
class Job:
    encoded: Encoded
    ks: list[int]
    exclude: list[bool]
    explain: list[bool]


def parse_json(body: bytes) -> Any:
    """A request body as JSON (UTF-8, nested at most MAX_DEPTH deep, integers of at most 20 digits);
    RequestError 400 otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(400, f"body is not valid JSON (not UTF-8: {error}); send a UTF-8 JSON object") from None
    depth = json_depth(body)
    if depth > MAX_DEPTH:
        raise RequestError(400, f"body nests arrays and objects {depth} deep; the limit is {MAX_DEPTH} "
                                '(a request nests 3: {"histories": [["242", "302"]]})')
    try:
        payload = json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant, object_pairs_hook=_no_twice)
    except json.JSONDecodeError as error:
        raise RequestError(400, f"body is not valid JSON ({error}); send a JSON object") from None
    except RecursionError:  # json_depth bounds it: a second line of defence
        raise RequestError(400, f"body nests arrays and objects too deep; the limit is {MAX_DEPTH}") from None
    return payload


def parse_request(body: bytes, recommender: Recommender, limits: Limits) -> Job:
    """The request body, checked and encoded; raises RequestError naming the first problem."""
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise RequestError(422, 'body must be a JSON object like {"histories": [["242", "302"]], "k": 10}')
    unknown_fields = sorted(set(payload) - FIELDS)
    if unknown_fields:
        raise RequestError(422, f"unknown field '{shown(unknown_fields[0])}'; the fields are histories, k, "
                                "exclude_seen, explain")
    if "histories" not in payload:
        raise RequestError(422, "missing field 'histories': a list of histories, each a list of item tokens")
    histories = payload["histories"]
    k = payload.get("k", 10)
    exclude_seen = payload.get("exclude_seen", recommender.exclude_seen)  # the artifact's default
    explain = payload.get("explain", False)
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
            if isinstance(token, str) and not valid_unicode(token):
                raise RequestError(
                    422, f"history {row}, position {position}: item token '{shown(token)}' holds a lone UTF-16 "
                    "surrogate; send valid Unicode")
    if isinstance(k, bool) or not isinstance(k, int):
        raise RequestError(422, f"'k' must be an integer, not {type(k).__name__}")
    if not isinstance(exclude_seen, bool):
        raise RequestError(422, f"'exclude_seen' must be true or false, not {type(exclude_seen).__name__}")
    if not isinstance(explain, bool):
        raise RequestError(422, f"'explain' must be true or false, not {type(explain).__name__}")
    try:
        recommender.check_k(k)
        recommender.check_explain(explain)
        encoded = recommender.encode(histories)  # it maps int tokens by str()
    except RecboleLLMError as error:
        raise RequestError(422, str(error)) from None
    rows = len(histories)
    job = Job(encoded, [k] * rows, [exclude_seen] * rows, [explain] * rows)
    if explain:  # what the model and the answer will really cost, counted before any of it is spent
        rows = recommender.explain_rows(encoded, job.explain)
        if rows > limits.max_explained:
            raise RequestError(413, f"explaining this request costs {rows} model rows (each history, and it once "
                                    f"without each item the model reads); the limit is {limits.max_explained}: send "
                                    "fewer or shorter histories, or start the service with a larger --max-explained")
        effects = recommender.explain_effects(encoded, job.ks, job.explain)
        if effects > EFFECTS_PER_ROW * limits.max_explained:
            raise RequestError(413, f"explaining this request reports {effects} effects (k={k} recommended items x "
                                    f"the items the model reads, per history); the limit is "
                                    f"{EFFECTS_PER_ROW * limits.max_explained} ({EFFECTS_PER_ROW} x --max-explained): "
                                    "ask for a smaller k or fewer histories, or start the service with a larger "
                                    "--max-explained")
    return job


def parse_items(body: bytes, limits: Limits) -> dict[str, Any]:
    """A POST /items body, ``{"items": {token: text or {field: value}}}``, checked for shape; what the items
    hold is checked by ``Recommender.add_items``. Raises RequestError naming the first problem."""
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise RequestError(422, 'body must be a JSON object {"items": {"new item token": "its text", ...}}')
    unknown_fields = sorted(set(payload) - {"items"})
    if unknown_fields:
        raise RequestError(422, f"unknown field '{shown(unknown_fields[0])}'; the only field is items")
    if not isinstance(payload.get("items"), dict):
        raise RequestError(422, '\'items\' must be a JSON object {"new item token": "its text", ...}')
    items = payload["items"]
    if not items:
        raise RequestError(422, "'items' is empty; give at least one new item token and its text")
    if len(items) > limits.max_new_items:
        raise RequestError(413, f"{len(items)} items in one request; the limit is {limits.max_new_items}")
    for token, text in items.items():
        strings = [token, *(part for pair in text.items() for part in pair)] if isinstance(text, dict) else [token, text]
        if not all(valid_unicode(value) for value in strings if isinstance(value, str)):
            raise RequestError(422, f"item '{shown(token)}' holds a lone UTF-16 surrogate; send valid Unicode")
    return items


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
            # an explained request runs alone: its cost is bounded (max_explained), so is everyone's wait
            while self.batching and not self.queue.empty() and not any(first[0].explain):
                waiting = self.queue.get_nowait()
                if rows + len(waiting[0].ks) > self.max_rows or any(waiting[0].explain):
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
            Encoded.join([job.encoded for job in jobs]),
            [k for job in jobs for k in job.ks],
            [e for job in jobs for e in job.exclude],
            [e for job in jobs for e in job.explain],
        )


def _check_can_listen(host: str, port: int) -> None:
    """Bind once before loading anything: a port in use or a host that is not this machine's is one line
    (uvicorn would log an error and exit 3 after the model loaded)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:
        raise RecboleLLMError(f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port "
                              "or --host") from None


def _require_serving_extra() -> None:
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise RecboleLLMError(f"serving needs {' and '.join(missing)}: pip install 'recbole_llm[serve]'")


class Drain:
    """The service's stop: set when a shutdown begins. Body reads in flight register their deadlines here,
    so that the shutdown can end them at once (with a 503) instead of waiting for slow clients."""

    def __init__(self) -> None:
        self.stopping = False
        self.reads: set[asyncio.Timeout] = set()

    def stop(self) -> None:
        self.stopping = True
        now = asyncio.get_running_loop().time()
        for deadline in self.reads:
            deadline.reschedule(now)


class _Guard:
    """ASGI middleware: a request still running when the shutdown drain runs out (uvicorn then cancels it)
    gets a 503 and one log line instead of a traceback."""

    def __init__(self, app, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except asyncio.CancelledError:
            if not self.drain.stopping:
                raise
            log.warning("%s %s was still running when the shutdown drain ran out; %s", scope["method"],
                        shown(scope["path"]), "its answer was cut" if started else "it got 503")
            if not started:
                body = json.dumps({"error": "the service shut down before answering; send the request again"})
                try:
                    async with asyncio.timeout(1):
                        await send({"type": "http.response.start", "status": 503,
                                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
                        await send({"type": "http.response.body", "body": body.encode()})
                except (TimeoutError, OSError):
                    pass


def repeat_notice(recommender: Recommender) -> str | None:
    """One line where offline and served answers treat repeated items differently: RecBole's evaluator counts
    an item already in the history as a hit; the service drops such items when exclude_seen is true (the
    artifact's default, from its training data's repeat_rate). None where the data has no repeats."""
    rate = recommender.repeat_rate
    if not rate:
        return None
    share = f"{100 * rate:.1f}% of next items in the training data were already in the user's history"
    if recommender.exclude_seen:
        return (f"{share}: exclude_seen defaults to true, so answers drop items RecBole's evaluator counted as hits; "
                'send "exclude_seen": false to keep them')
    return (f"{share}: exclude_seen defaults to false (users come back to items), as RecBole's evaluator scored it; "
            'send "exclude_seen": true to drop seen items')


def _client(scope) -> str:
    client = scope.get("client")
    return f"client {client[0]}:{client[1]}" if client else "a client"


def create_app(
    artifact: str | Path,
    limits: Limits | None = None,
    unknown_tokens: str = "skip",
    batching: bool = True,
    intra_op_threads: int | None = None,
    allow_item_updates: bool = False,
    retrieval: str = "exact",
):
    """The FastAPI application serving ``artifact``; ``app.state.drain`` is the stop ``serve`` sets.
    ``allow_item_updates`` turns POST /items on (an artifact exported with --item-index and item text);
    ``retrieval`` is the Recommender's (``exact``, or ``ann`` on an item index)."""
    from contextlib import asynccontextmanager

    _require_serving_extra()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    limits = limits or Limits()
    limits.check()
    recommender = Recommender(artifact, unknown_tokens=unknown_tokens, intra_op_threads=intra_op_threads,
                              retrieval=retrieval)
    if allow_item_updates and not recommender.text_tower:
        raise RecboleLLMError(f"--allow-item-updates needs an artifact exported with --item-index from a model with "
                              f"item text; '{artifact}' has {'no text tower' if recommender.item_index else 'no item index'}")
    batcher = Batcher(recommender, limits.max_batch, batching)
    drain = Drain()
    public_metadata = {key: value for key, value in recommender.metadata.items() if key != "item_tokens"}
    public_metadata["n_item_tokens"] = len(recommender.tokens) - 1
    public_metadata["session"] = recommender.session_settings
    public_metadata["service"] = {**asdict(limits), "unknown_tokens": unknown_tokens, "batching": batching,
                                  "exclude_seen_default": recommender.exclude_seen,
                                  "max_k": recommender.max_k, "item_updates": allow_item_updates,
                                  "retrieval": retrieval,
                                  "providers": recommender.session.get_providers()}

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="recbole_llm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, drain=drain)
    app.state.batcher = batcher
    app.state.drain = drain

    def error(status: int, message: str, close: bool = False) -> JSONResponse:
        headers = {"connection": "close"} if close else None
        return JSONResponse({"error": shown(message, 1000)}, status_code=status, headers=headers)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and (
                len(declared) > 18 or int(declared) > limits.max_body_bytes):
            raise RequestError(413, f"body of {shown(declared, 20)} bytes; the limit is {limits.max_body_bytes}",
                               close=True)
        body = bytearray()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(limits.body_timeout) as deadline:
                drain.reads.add(deadline)
                if drain.stopping:
                    deadline.reschedule(loop.time())
                try:
                    while True:
                        message = await request.receive()
                        if message["type"] == "http.disconnect":
                            raise ClientGone(f"after {len(body)} of {declared or 'unknown'} body bytes")
                        body += message.get("body", b"")
                        if len(body) > limits.max_body_bytes:
                            raise RequestError(413, f"body over {limits.max_body_bytes} bytes; the limit is "
                                                    f"{limits.max_body_bytes}", close=True)
                        if not message.get("more_body", False):
                            return bytes(body)
                finally:
                    drain.reads.discard(deadline)
        except TimeoutError:
            if drain.stopping:
                raise RequestError(503, "the service is shutting down; send the request again", close=True) from None
            log.warning("%s sent %d of %s body bytes in %g s; answered 408", _client(request.scope), len(body),
                        declared or "unknown", limits.body_timeout)
            raise RequestError(408, f"the body did not arrive within {limits.body_timeout:g} s (got {len(body)} "
                                    f"bytes); send the whole request at once", close=True) from None

    @app.post("/recommend")
    async def recommend(request: Request):
        try:
            job = parse_request(await read_body(request), recommender, limits)
        except RequestError as refused:
            return error(refused.status, str(refused), refused.close)
        except ClientGone as gone:
            log.warning("%s went away %s; request dropped", _client(request.scope), gone)
            return error(400, "the client went away before its body was read", close=True)  # nobody reads it
        try:
            answers = await batcher.submit(job)
        except Exception as failure:  # noqa: BLE001 - the service stays up and says what failed
            return error(500, f"the model failed on this request: {type(failure).__name__}: {failure}")
        # explanations only where asked for: other answers keep the shape they always had
        return {"recommendations": [{key: value for key, value in asdict(answer).items()
                                     if key != "explanations" or value is not None} for answer in answers]}

    adding = asyncio.Lock()  # one update at a time; recommendations go on meanwhile
    added_here: list[str] = []  # items added over POST /items: in memory only, gone when the service stops

    @app.post("/items")
    async def items(request: Request):
        if not allow_item_updates:
            return error(403, "adding items is off; start the service with --allow-item-updates (an artifact "
                              "exported with --item-index)")
        try:
            new = parse_items(await read_body(request), limits)
        except RequestError as refused:
            return error(refused.status, str(refused), refused.close)
        except ClientGone as gone:
            log.warning("%s went away %s; request dropped", _client(request.scope), gone)
            return error(400, "the client went away before its body was read", close=True)
        async with adding:
            try:
                await asyncio.to_thread(recommender.add_items, new)
            except ArtifactError as broken:  # the artifact's text tower, not the request
                return error(500, f"the artifact's text tower failed: {broken}")
            except RecboleLLMError as refused:
                status = 409 if "already in the artifact" in str(refused) else 422
                return error(status, str(refused))
            except Exception as failure:  # noqa: BLE001
                return error(500, f"the text tower failed on this request: {type(failure).__name__}: {failure}")
        added_here.extend(str(token) for token in new)
        return {"added": [str(token) for token in new], "n_item_tokens": len(recommender.tokens) - 1}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        current = {**public_metadata, "model_calls": batcher.calls, "rows_scored": batcher.rows}
        if added_here:  # the catalogue served now, not the one on disk
            current.update(n_items=len(recommender.tokens), n_item_tokens=len(recommender.tokens) - 1,
                           items_added_since_start=len(added_here))
            current["service"] = {**current["service"], "max_k": recommender.max_k}
            current.pop("item_index", None)
        return current

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return error(404, f"no route {request.method} {shown(request.url.path)}; use POST /recommend, POST /items, "
                          "GET /health, GET /metadata")

    @app.exception_handler(405)
    async def wrong_method(request: Request, exc):
        return error(405, f"{request.method} is not allowed on {shown(request.url.path)}")

    return app


def _protocol_class(timeout: float):
    """uvicorn's h11 protocol with two more deadlines, ``timeout`` seconds each: a request's head (request
    line and headers) must arrive within it from its first byte, and a client must keep taking its answer
    (some of it each ``timeout``), else the connection is dropped. uvicorn's keep-alive timeout ends idle
    connections only after a response; here it also ends a new one that sends nothing."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineProtocol(H11Protocol):
        head_deadline: asyncio.TimerHandle | None = None
        write_watch: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

        def data_received(self, data: bytes) -> None:
            if self.head_deadline is None and (self.cycle is None or self.cycle.response_complete):
                self.head_deadline = self.loop.call_later(timeout, self._head_timed_out)
            super().data_received(data)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a whole request head arrived
                self._disarm_head_deadline()

        def on_response_complete(self) -> None:
            self._watch_writes(None)
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm_head_deadline()
            if self.write_watch is not None:
                self.write_watch.cancel()
            super().connection_lost(exc)

        def _watch_writes(self, unsent_before: int | None) -> None:
            """The answer still buffered here must shrink every ``timeout`` seconds: asyncio holds it, and
            closing the connection waits for it, for as long as a client does not read."""
            if self.write_watch is not None:
                self.write_watch.cancel()
                self.write_watch = None
            unsent = self.transport.get_write_buffer_size()
            if not unsent:
                return
            if unsent_before is not None and unsent >= unsent_before:
                log.warning("%s took none of its answer in %g s (%d bytes unsent); connection dropped",
                            self._who(), timeout, unsent)
                self.transport.abort()
                return
            self.write_watch = self.loop.call_later(timeout, self._watch_writes, unsent)

        def _who(self) -> str:
            return "client %s:%d" % self.client if self.client else "a client"

        def _disarm_head_deadline(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None

        def _head_timed_out(self) -> None:
            self.head_deadline = None
            if not self.transport.is_closing():
                log.warning("%s sent no whole request head within %g s; connection closed", self._who(), timeout)
                self.timeout_keep_alive_handler()  # uvicorn's close of an idle connection

    return DeadlineProtocol


def _server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server; its shutdown first ends the body reads in flight (``Drain``), then drains as
        uvicorn does, for at most ``timeout_graceful_shutdown`` seconds."""

        def __init__(self, config, drain: Drain):
            super().__init__(config)
            self.drain = drain

        async def shutdown(self, sockets=None) -> None:
            self.drain.stop()
            await super().shutdown(sockets)

    return DrainingServer


def serve(
    artifact: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    unknown_tokens: str = "skip",
    batching: bool = True,
    intra_op_threads: int | None = None,
    allow_item_updates: bool = False,
    retrieval: str = "exact",
) -> None:
    """Run the service until interrupted (SIGINT or SIGTERM: a drain bounded by ``limits.shutdown_timeout``)."""
    _require_serving_extra()
    import uvicorn

    limits = limits or Limits()
    limits.check()
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise RecboleLLMError(f"--port {port!r} is not a TCP port; use 1 to 65535")
    if unknown_tokens not in UNKNOWN_TOKEN_POLICIES:
        raise RecboleLLMError(f"--unknown-tokens '{unknown_tokens}' is not a policy; use skip or error")
    _check_can_listen(host, port)
    app = create_app(artifact, limits, unknown_tokens, batching, intra_op_threads, allow_item_updates, retrieval)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False,
        http=_protocol_class(limits.body_timeout),
        timeout_keep_alive=limits.keep_alive_timeout,
        timeout_graceful_shutdown=limits.shutdown_timeout,
    )
    providers = ", ".join(app.state.batcher.recommender.session.get_providers())
    extras = "".join([", retrieval ann" if retrieval == "ann" else "",
                      ", POST /items on (items added are kept in memory only)" if allow_item_updates else ""])
    print(f"recbole-llm serve: {artifact} on http://{host}:{port} ({providers}{extras}); SIGINT or SIGTERM stops it",
          file=sys.stderr, flush=True)
    notice = repeat_notice(app.state.batcher.recommender)
    if notice:
        print(f"recbole-llm serve: {notice}", file=sys.stderr, flush=True)
    try:
        _server_class()(config, app.state.drain).run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it drained for: the drain is done
        pass
