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
(ONNX Runtime and numpy, no torch or RecBole). Binds 127.0.0.1 unless told otherwise. Bodies are read here,
within ``body_timeout`` (408 past it), and checked in :mod:`~recbole_llm.serving.requests` (every refusal one
line; a refused request never reaches the model); requests that arrive together share a model call
(:mod:`~recbole_llm.serving.batching`). ``serve`` runs the application on uvicorn, with the deadlines and the
graceful shutdown of :mod:`~recbole_llm.serving.server`.
"""


# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from recbole_llm.errors import ArtifactError, ItemExistsError, RecboleLLMError, shown
from recbole_llm.serving.batching import Batcher
from recbole_llm.serving.requests import ClientGone, Limits, RequestError, parse_items, parse_request
from recbole_llm.serving.runtime import UNKNOWN_TOKEN_POLICIES, Recommender
from recbole_llm.serving.server import Drain, Guard, check_can_listen, protocol_class, server_class

log = logging.getLogger("uvicorn.error")  # uvicorn formats it: one line per event


def _require_serving_extra() -> None:
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise RecboleLLMError(f"serving needs {' and '.join(missing)}: pip install 'recbole_llm[serve]'")


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
    app.add_middleware(Guard, drain=drain)
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
            except ItemExistsError as taken:  # the error's type decides the status, never its wording
                return error(409, str(taken))
            except RecboleLLMError as refused:
                return error(422, str(refused))
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
    check_can_listen(host, port)
    app = create_app(artifact, limits, unknown_tokens, batching, intra_op_threads, allow_item_updates, retrieval)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False,
        http=protocol_class(limits.body_timeout),
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
        server_class()(config, app.state.drain).run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it drained for: the drain is done
        pass
