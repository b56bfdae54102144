"""Reading a request: the service's limits, and JSON bodies checked by hand into the runtime's rows.

Requests are read and checked by hand rather than by a pydantic model, so that every refusal is one line
naming the problem (:class:`RequestError`, with its HTTP status): 400 for a body that is not JSON (or not
UTF-8, or nested deeper than any request is), 413 for a body, batch or history over the limits or an
explained request costing more than ``max_explained`` model rows (each history, and it without each item
read) or ``EFFECTS_PER_ROW`` times as many effects in its answer (k x items read, per history), 422 for
well-formed JSON with a wrong field, type or value (an integer of more than 20 digits, a string with a lone
surrogate). A refused request never reaches the model.

:class:`Limits` holds the defaults the command line shows (numpy only: no fastapi, no ONNX Runtime).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from recbole_llm.errors import RecboleLLMError, shown
from recbole_llm.serving.batching import Job
from recbole_llm.serving.tokens import valid_unicode

FIELDS = {"histories", "k", "exclude_seen", "explain"}
MAX_DEPTH = 8  # arrays and objects nested in a body; a request nests 3: {"histories": [["242", ...]]}
DEFAULT_K = 10  # items per answer when a request does not say: the service's, and Triton's
MAX_INT_DIGITS = 20  # an integer item token or k: 64-bit ids fit, longer ones are sent as strings
EFFECTS_PER_ROW = 100  # effects an explained answer may report per model row --max-explained allows (k <= 100
# on average over the items read): the answer's size, bounded by the same flag


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


def parse_request(body: bytes, recommender, limits: Limits) -> Job:
    """The request body, checked and encoded by ``recommender`` (a :class:`~recbole_llm.serving.runtime.Recommender`);
    raises RequestError naming the first problem."""
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
    k = payload.get("k", DEFAULT_K)
    exclude_seen = payload.get("exclude_seen", recommender.exclude_seen)  # the artifact's default
    explain = payload.get("explain", False)
    if not isinstance(histories, list) or not histories:
        raise RequestError(422, "'histories' must be a non-empty list of histories (lists of item tokens)")
    check_histories(histories, limits)
    if isinstance(k, bool) or not isinstance(k, int):
        raise RequestError(422, f"'k' must be an integer, not {type(k).__name__}")
    if not isinstance(exclude_seen, bool):
        raise RequestError(422, f"'exclude_seen' must be true or false, not {type(exclude_seen).__name__}")
    if not isinstance(explain, bool):
        raise RequestError(422, f"'explain' must be true or false, not {type(explain).__name__}")
    rows = len(histories)
    return make_job(histories, [k] * rows, [exclude_seen] * rows, explain, recommender, limits)


def check_histories(histories: list, limits: Limits) -> None:
    """The service's bounds on histories, for every protocol (JSON over HTTP, Triton's tensors): at most
    ``limits.max_batch`` histories (413), each a list (422) of at most ``limits.max_history`` tokens (413), each
    token a string of valid Unicode or an integer (422). Raises RequestError naming the first problem."""
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


def make_job(histories: list, ks: list[int], exclude_seen: list[bool], explain: bool, recommender,
             limits: Limits) -> Job:
    """Histories that passed :func:`check_histories`, encoded by ``recommender`` (a
    :class:`~recbole_llm.serving.runtime.Recommender`) into a :class:`Job`, with one ``k`` and one
    ``exclude_seen`` per history (integers and booleans). Each k must be within the artifact's range, each history
    must hold a known item (and no unknown one under ``unknown_tokens="error"``), and an explained request must
    fit ``limits.max_explained``; raises RequestError (422, or 413 for the explain bound) naming the first problem."""
    try:
        for k in dict.fromkeys(ks):  # each distinct k once, in order
            recommender.check_k(k)
        recommender.check_explain(explain)
        encoded = recommender.encode(histories)  # it maps int tokens by str()
    except RecboleLLMError as error:
        raise RequestError(422, str(error)) from None
    rows = len(histories)
    job = Job(encoded, list(ks), list(exclude_seen), [explain] * rows)
    if explain:  # what the model and the answer will really cost, counted before any of it is spent
        rows = recommender.explain_rows(encoded, job.explain)
        if rows > limits.max_explained:
            raise RequestError(413, f"explaining this request costs {rows} model rows (each history, and it once "
                                    f"without each item the model reads); the limit is {limits.max_explained}: send "
                                    "fewer or shorter histories, or start the service with a larger --max-explained")
        effects = recommender.explain_effects(encoded, job.ks, job.explain)
        if effects > EFFECTS_PER_ROW * limits.max_explained:
            k = max(ks)
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
