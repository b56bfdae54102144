"""Hostile input to recbole-llm serve and the runtime: every malformed request gets a one-line 4xx, every
client's time is bounded, a broken artifact fails at load, bad arguments fail at once; never a 500 or a
traceback. The service runs in its own process over a real exported artifact, on 127.0.0.1 only."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from recbole_llm.cli import main
from recbole_llm.errors import RecboleLLMError
from recbole_llm.artifact import input_names, output_names
from recbole_llm.serving.runtime import Recommender
from helpers import BAD_REQUESTS, LIMITS, LoggedService, Service, direct, free_port, same

BODY_LIMIT = 8192  # room for the hostile bodies below (a 5,000-digit integer), which 4096 would refuse as 413
TIMEOUTS = ["--body-timeout", "1", "--keep-alive-timeout", "1", "--shutdown-timeout", "5"]
GOOD = [{"histories": [["1", "2", "3"], ["50"]], "k": 10}, {"histories": [[7, 9, 11]], "k": 3, "exclude_seen": False}]

HOSTILE_REQUESTS = [
    # nesting: the parser would recurse past Python's limit
    (b"[" * 3000, 400, "nests arrays and objects 3000 deep; the limit is 8"),
    (b'{"histories": ' + b"[" * 3000 + b"]" * 3000 + b"}", 400, "3001 deep"),
    (b'{"histories": [["1"]], "k": ' + b'{"a":' * 1100 + b"1" + b"}" * 1100 + b"}", 400, "1101 deep"),
    # brackets and escaped quotes inside strings are not nesting; an escaped backslash ends a string
    (b'{"histories": [["1"]], "pad": "' + b'\\"[{' * 500 + b'"}', 422, "unknown field 'pad'"),
    (b'{"histories": [["1"]], "pad": "\\\\", "x": ' + b"[" * 9 + b"1" + b"]" * 9 + b"}", 400, "10 deep"),
    # numbers: Python refuses to convert integers of over 4,300 digits; the contract has no use for 21
    (b'{"histories": [["1", ' + b"7" * 5000 + b"]]}", 422, "an integer of 5000 digits"),
    (b'{"histories": [["1"]], "k": ' + b"7" * 5000 + b"}", 422, "an integer of 5000 digits"),
    (b'{"histories": [["1"]], "k": -' + b"7" * 5000 + b"}", 422, "an integer of 5000 digits"),
    ({"histories": [["1", 10**20]]}, 422, "an integer of 21 digits"),
    ({"histories": [["1"]], "k": 10**19}, 422, "k beyond 10^12 is out of range"),
    (b'{"histories": [["1"]], "k": 1e999}', 422, "'k' must be an integer, not float"),
    (b'{"histories": [["1"]], "k": NaN}', 400, "NaN is not a JSON value"),
    (b'{"histories": [["1", -Infinity]]}', 400, "-Infinity is not a JSON value"),
    # strings that are not Unicode, and text that must not break the one-line error
    (b'{"histories": [["1", "\\ud800"]]}', 422, "position 1: item token '\\ud800' holds a lone UTF-16 surrogate"),
    (b'{"histories": [["\\udfff2"]]}', 422, "position 0: item token '\\udfff2' holds a lone UTF-16 surrogate"),
    (b'{"histories": [["1"]], "\\ud800": 1}', 422, "unknown field '\\ud800'"),
    ({"histories": [["1"]], "k\n\r\u2028": 1}, 422, "unknown field 'k\\n\\r\\u2028'"),
    ({"histories": [["1"]], "x" * 500: 1}, 422, "(500 characters)"),
    (b'{"histories": [["1"]], "k": 3' + b"\xed\xa0\x80" + b"}", 400, "not UTF-8"),
    (b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode(), 400, "not valid JSON"),
    # shapes the contract does not allow
    ({"histories": [["1", ["2"]]]}, 422, "history 0, position 1: item tokens must be strings or integers, not list"),
    ({"histories": [["1", {"2": 3}]]}, 422, "history 0, position 1: item tokens must be strings or integers, not dict"),
    ({"histories": [{"1": "2"}]}, 422, "history 0 must be a list of item tokens, not dict"),
    ({"histories": {"0": ["1"]}}, 422, "non-empty list"),
    ({"histories": None}, 422, "non-empty list"),
]


def at_this_body_limit(requests):
    """test_serve's requests, its 4096-byte body check moved to this module's limit."""
    for payload, status, message in requests:
        if message == "the limit is 4096":
            payload = b'{"histories": [["1"]], "pad": "' + b"x" * BODY_LIMIT + b'"}'
            message = f"the limit is {BODY_LIMIT}"
        yield payload, status, message


def read_until_closed(client: socket.socket, seconds: float) -> tuple[bytes, float]:
    """Everything the service sends until it closes the connection, and when it closed (bounded)."""
    start = time.monotonic()
    client.settimeout(seconds)
    received = b""
    try:
        while time.monotonic() - start < seconds:
            chunk = client.recv(65536)
            if not chunk:
                break
            received += chunk
    except (socket.timeout, ConnectionError):
        pass
    finally:
        client.close()
    return received, time.monotonic() - start


def status_of(response: bytes) -> int | None:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else None


def error_of(response: bytes) -> str:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]


PARTIAL_BODY = b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n" + b'{"hist'
PARTIAL_HEAD = b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"


@pytest.fixture(scope="module")
def hostile(artifact):
    running = LoggedService(artifact, *LIMITS, "--max-body-bytes", str(BODY_LIMIT), *TIMEOUTS)
    yield running
    running.close()


def check_refusals(service: Service, requests) -> None:
    for payload, status, message in requests:
        got_status, body = service.recommend(payload)
        assert (got_status, message in body.get("error", "")) == (status, True), (payload[:80], got_status, body)
        assert "\n" not in body["error"] and "\r" not in body["error"] and len(body["error"]) < 1100


def slow_clients(service: LoggedService) -> None:
    """A body that stops (408, connection closed), a head that stops and a silent connection (closed), a
    client that leaves mid-body (one log line): each within the 1 s deadlines, bounded here at 8 s."""
    response, took = read_until_closed(service.connect(PARTIAL_BODY), 8)
    assert status_of(response) == 408 and "did not arrive within 1 s (got 6 bytes)" in error_of(response)
    assert b"connection: close" in response.lower() and 0.5 < took < 5, took
    for opening in (PARTIAL_HEAD, b""):
        response, took = read_until_closed(service.connect(opening), 8)
        assert response == b"" and 0.5 < took < 5, (opening, response, took)
    service.connect(PARTIAL_BODY).close()
    assert service.wait_for_log("went away after 6 of 100 body bytes; request dropped")


@pytest.mark.slow
def test_hostile_requests_get_a_one_line_4xx(hostile):
    check_refusals(hostile, HOSTILE_REQUESTS)
    assert "Traceback" not in hostile.log


@pytest.mark.slow
def test_a_stalled_body_gets_408_a_stalled_head_and_a_silent_connection_are_closed(hostile):
    slow_clients(hostile)
    assert "sent 6 of 100 body bytes in 1 s; answered 408" in hostile.log
    assert "sent no whole request head within 1 s; connection closed" in hostile.log
    # a kept-alive connection that goes quiet after an answer is closed after --keep-alive-timeout
    body = json.dumps(GOOD[0]).encode()
    client = hostile.connect(b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
    response, took = read_until_closed(client, 8)
    assert status_of(response) == 200 and 0.5 < took < 5
    assert "Traceback" not in hostile.log


@pytest.mark.slow
def test_every_malformed_request_on_one_service_leaves_answers_and_log_clean(hostile, artifact):
    before = [hostile.recommend(request) for request in GOOD]
    assert [status for status, _ in before] == [200, 200]
    check_refusals(hostile, list(at_this_body_limit(BAD_REQUESTS)) + HOSTILE_REQUESTS)
    slow_clients(hostile)
    bad_chunk = b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    assert status_of(read_until_closed(hostile.connect(bad_chunk), 8)[0]) == 400
    status, body = hostile.get("/no-such-route%0a%ed%a0%80")
    assert status == 404 and "\n" not in body["error"]
    # still up, the same answers as before, and the runtime's answers
    assert hostile.get("/health") == (200, {"status": "ok"})
    assert [hostile.recommend(request) for request in GOOD] == before
    for request, (_, answer) in zip(GOOD, before):
        assert same(answer["recommendations"], direct(artifact, request["histories"], request["k"],
                                                      request.get("exclude_seen", True)))
    assert hostile.process.poll() is None
    assert "Traceback" not in hostile.log and "Exception in ASGI" not in hostile.log, hostile.log
    limits = hostile.get("/metadata")[1]["service"]
    assert (limits["body_timeout"], limits["keep_alive_timeout"], limits["shutdown_timeout"]) == (1, 1, 5)


SHUTDOWN_SCRIPT = """
import asyncio, sys
from recbole_llm.serving import http as serve
from recbole_llm.serving.batching import Batcher
from recbole_llm.serving.requests import Limits

answer = Batcher.submit


async def submit(self, job):  # k=2 stands for a model call that outlives the shutdown drain
    if job.ks[0] == 2:
        await asyncio.sleep(3600)
    return await answer(self, job)


Batcher.submit = submit
serve.serve(sys.argv[1], port=int(sys.argv[2]), limits=Limits(body_timeout=2.0, shutdown_timeout=1.0))
"""


class ShutdownService(LoggedService):
    """The service through ``recbole_llm.serving.http.serve`` (body timeout 2 s, drain 1 s), one model call stuck."""

    def __init__(self, artifact: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-c", SHUTDOWN_SCRIPT, artifact, str(self.port)],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self.reader = threading.Thread(target=self._read_log, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"service did not start: {self.log}")


def kernel_send_buffer_max() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 << 20


@pytest.mark.slow
def test_a_reader_that_stops_is_dropped_and_sigterm_drains_in_bounded_time(artifact):
    service = ShutdownService(artifact)
    try:
        # answers of ~7 MB each to a client that reads none of them, more than the kernel's socket buffers
        # hold: dropped once it stops taking them
        body = json.dumps({"histories": [["1"]] * 256, "k": 1000}).encode()
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", service.port))
        reader.sendall(b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                       % (len(body), body) * (1 + kernel_send_buffer_max() // (6 << 20)))
        assert service.wait_for_log("took none of its answer in 2 s", 15), service.log
        reader.close()
        # at SIGTERM: a client in the middle of its body is answered 503 at once, a model call still running
        # when the 1 s drain ends gets 503 too, and the service exits
        stalled = service.connect(PARTIAL_BODY)
        stuck = []
        waiting = threading.Thread(target=lambda: stuck.append(service.recommend({"histories": [["1"]], "k": 2})))
        waiting.start()
        time.sleep(0.5)
        service.process.send_signal(signal.SIGTERM)
        response, _ = read_until_closed(stalled, 10)
        assert status_of(response) == 503 and "shutting down" in error_of(response)
        waiting.join(timeout=20)
        assert stuck and stuck[0][0] == 503 and "shut down before answering" in stuck[0][1]["error"], stuck
        service.process.wait(timeout=20)
    finally:
        service.close()
    assert "POST /recommend was still running when the shutdown drain ran out; it got 503" in service.log
    assert "Traceback" not in service.log, service.log


# ------------------------------------------------------------------------------------------------------
# artifacts are checked when they are loaded


@pytest.fixture(scope="module")
def top_artifact(serving_artifacts) -> str:
    return serving_artifacts["top"]


def without_graph_metadata(folder: Path) -> None:
    import onnx

    model = onnx.load(str(folder / "model.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(folder / "model.onnx"))


def edit(metadata: dict, **changes) -> dict:
    return {key: value for key, value in {**metadata, **changes}.items() if value is not DROP}


DROP = object()
BROKEN_ARTIFACTS = [
    # (name, which artifact, change: (folder, metadata) -> None, the file named, words of the message)
    ("empty model", "full", lambda f, m: (f / "model.onnx").write_bytes(b""), "model.onnx", "truncated or corrupt"),
    ("truncated model", "full", lambda f, m: (f / "model.onnx").write_bytes((f / "model.onnx").read_bytes()[:5000]),
     "model.onnx", "INVALID_PROTOBUF"),
    ("junk model", "full", lambda f, m: (f / "model.onnx").write_bytes(b"\x08junk" * 300), "model.onnx",
     "ONNX Runtime cannot load"),
    ("metadata not JSON", "full", lambda f, m: (f / "metadata.json").write_text('{"max_length": 12,'),
     "metadata.json", "is not JSON"),
    ("metadata not UTF-8", "full", lambda f, m: (f / "metadata.json").write_bytes(b"\xff\x00\xfe"), "metadata.json",
     "is not JSON"),
    ("metadata a list", "full", lambda f, m: (f / "metadata.json").write_text(json.dumps([m])), "metadata.json",
     "holds a JSON list, not an object"),
    ("no item_tokens", "full", lambda f, m: edit(m, item_tokens=DROP), "metadata.json", "has no 'item_tokens'"),
    ("no max_length", "full", lambda f, m: edit(m, max_length=DROP), "metadata.json", "has no 'max_length'"),
    ("max_length a string", "full", lambda f, m: edit(m, max_length="12"), "metadata.json",
     "max_length must be an integer from 1 to 65536, not '12'"),
    ("max_length huge", "full", lambda f, m: edit(m, max_length=10**12), "metadata.json",
     "max_length must be an integer from 1 to 65536"),
    ("item_tokens a dict", "full", lambda f, m: edit(m, item_tokens={"1": "a"}), "metadata.json",
     "item_tokens must be a list"),
    ("item_tokens with an int", "full",
     lambda f, m: edit(m, item_tokens=m["item_tokens"][:3] + [7] + m["item_tokens"][4:]), "metadata.json",
     "item_tokens[3] is int 7, not a string"),
    ("item token twice", "full", lambda f, m: edit(m, item_tokens=m["item_tokens"][:-1] + [m["item_tokens"][1]]),
     "metadata.json", "is listed twice in item_tokens"),
    ("top_k a bool", "full", lambda f, m: edit(m, top_k=True), "metadata.json", "top_k must be null or an integer"),
    ("n_items disagrees", "full", lambda f, m: edit(m, n_items=m["n_items"] + 1), "metadata.json",
     "lists {n} item_tokens"),
    ("item_tokens shorter than the scores", "full",
     lambda f, m: edit(m, item_tokens=m["item_tokens"][:-5], n_items=m["n_items"] - 5), "model.onnx", "scores {n} items"),
    ("item_tokens reordered", "full",
     lambda f, m: edit(m, item_tokens=m["item_tokens"][:1] + m["item_tokens"][1:][::-1]), "model.onnx",
     "other item_tokens than"),
    ("max_length longer than the graph", "full", lambda f, m: edit(m, max_length=m["max_length"] + 8), "model.onnx",
     "was exported with max_length="),
    ("max_length shorter than the graph", "full", lambda f, m: edit(m, max_length=m["max_length"] - 4), "model.onnx",
     "was exported with max_length="),
    ("max_length longer, graph without metadata_props", "full",
     lambda f, m: (without_graph_metadata(f), edit(m, max_length=m["max_length"] + 8))[1], "model.onnx",
     "does not say which max_length it was exported with"),
    ("item_tokens reordered, graph without metadata_props", "top",
     lambda f, m: (without_graph_metadata(f), edit(m, item_tokens=m["item_tokens"][:1] + m["item_tokens"][1:][::-1]))[1],
     "model.onnx", "does not say which max_length it was exported with"),
    ("no padding token first", "full", lambda f, m: edit(m, item_tokens=["x"] + m["item_tokens"][1:]), "metadata.json",
     "not the padding '[PAD]'"),
    ("precision unknown", "full", lambda f, m: edit(m, precision="bf16"), "metadata.json",
     "precision must be one of fp32, int8, fp16"),
    ("no model name", "full", lambda f, m: edit(m, model=DROP), "metadata.json", "has no 'model'"),
    ("inputs not names", "full", lambda f, m: edit(m, inputs="item_seq"), "metadata.json", "inputs must be a list"),
    ("top_k on a graph that scores every item", "full", lambda f, m: edit(m, top_k=5, inputs=input_names(5), outputs=output_names(5)), "model.onnx",
     "scores every item (exported without --top-k) but"),
    ("top_k null on a top-k graph", "top", lambda f, m: edit(m, top_k=None, inputs=input_names(None), outputs=output_names(None)), "model.onnx",
     "returns top-k items (exported with --top-k) but"),
    ("top_k the graph does not have", "top", lambda f, m: edit(m, top_k=3), "model.onnx", "returns 5 items"),
    ("item_tokens shorter than a top-k graph's items", "top",
     lambda f, m: edit(m, item_tokens=m["item_tokens"][:-5], n_items=m["n_items"] - 5), "model.onnx",
     "was exported with n_items="),
]


@pytest.mark.parametrize("name, which, change, named, words", BROKEN_ARTIFACTS, ids=[c[0] for c in BROKEN_ARTIFACTS])
def test_a_broken_artifact_fails_at_load_in_one_line(name, which, change, named, words, artifact, top_artifact,
                                                      tmp_path):
    import shutil

    folder = tmp_path / "artifact"
    shutil.copytree(artifact if which == "full" else top_artifact, folder)
    metadata = json.loads((folder / "metadata.json").read_text())
    edited = change(folder, metadata)
    if isinstance(edited, dict):
        (folder / "metadata.json").write_text(json.dumps(edited))
    with pytest.raises(RecboleLLMError) as raised:
        Recommender(folder)
    message = str(raised.value)
    assert str(folder / named) in message and words.format(n=len(metadata["item_tokens"])) in message, message
    assert "\n" not in message and "export" in message


@pytest.mark.slow
def test_serve_exits_2_without_a_traceback_on_a_broken_artifact(artifact, tmp_path, capsys, monkeypatch):
    import shutil

    folder = tmp_path / "artifact"
    shutil.copytree(artifact, folder)
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes()[:4096])
    result = subprocess.run([sys.executable, "-m", "recbole_llm", "serve", str(folder), "--port", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("recbole-llm: error: ONNX Runtime cannot load")
    # in-process too: the same check runs before uvicorn is started
    shutil.copytree(artifact, folder, dirs_exist_ok=True)
    metadata = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**metadata, "top_k": 4}))
    monkeypatch.setattr("uvicorn.Server.run", lambda *args, **kwargs: pytest.fail("the service started"))
    assert main(["serve", str(folder)]) == 2
    assert capsys.readouterr().err.startswith(f"recbole-llm: error: '{folder / 'model.onnx'}' scores every item")


# ------------------------------------------------------------------------------------------------------
# arguments


SERVE_ARGUMENTS = [
    (["--port", "0"], "--port 0 is not a TCP port; use 1 to 65535"),
    (["--port", "65536"], "--port 65536 is not a TCP port"),
    (["--port", "-80"], "--port -80 is not a TCP port"),
    (["--port", "http"], "argument --port: invalid int value: 'http'"),
    (["--threads", "0"], "--threads 0 must be a positive number of threads"),
    (["--threads", "-4"], "--threads -4 must be a positive number of threads"),
    (["--body-timeout", "0"], "--body-timeout must be a number of seconds above 0"),
    (["--body-timeout", "nan"], "--body-timeout must be a number of seconds above 0"),
    (["--keep-alive-timeout", "-1"], "--keep-alive-timeout must be a number of seconds above 0"),
    (["--shutdown-timeout", "inf"], "--shutdown-timeout must be a number of seconds above 0"),
    (["--max-batch", "0"], "--max-batch must be a positive integer"),
]


@pytest.mark.parametrize("arguments, message", SERVE_ARGUMENTS, ids=[" ".join(a) for a, _ in SERVE_ARGUMENTS])
def test_serve_refuses_bad_arguments_at_once(arguments, message, tmp_path, capsys, monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("serve() was called: the arguments were not checked first")

    monkeypatch.setattr("recbole_llm.serving.http.serve", started)
    try:
        status = main(["serve", str(tmp_path), *arguments])
    except SystemExit as exit:
        status = exit.code
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("recbole-llm: error: ") and message in err, err
    assert err.count("\n") == 1


# ------------------------------------------------------------------------------------------------------
# the runtime's own input checks


NOT_HISTORIES = [
    ("1 2 3", "histories must be a list of histories (lists of item tokens), not str"),
    (None, "histories must be a list of histories (lists of item tokens), not NoneType"),
    ({"user": ["1", "2"]}, "not dict"),
    ({1: ["1"]}, "not dict"),
    (7, "not int"),
    ([], "histories is empty"),
    (["1", "2"], "history 0 must be a list of item tokens, not str"),
    ([None], "history 0 must be a list of item tokens, not NoneType"),
    ([{"1": 2}], "history 0 must be a list of item tokens, not dict"),
    ([["1"], 5], "history 1 must be a list of item tokens, not int"),
    ([[["1", "2"]]], "history 0, position 0: item tokens must be strings or integers, not list"),
    ([["1", ["2"]]], "history 0, position 1: item tokens must be strings or integers, not list"),
    ([["1", 2.0]], "history 0, position 1: item tokens must be strings or integers, not float"),
    ([["1", True]], "history 0, position 1: item tokens must be strings or integers, not bool"),
    ([["1", None]], "history 0, position 1: item tokens must be strings or integers, not NoneType"),
    (np.array([[["1"]]]), "not ndarray"),
]


def test_recommend_refuses_what_is_not_a_list_of_histories(artifact):
    recommender = Recommender(artifact)
    for histories, message in NOT_HISTORIES:
        with pytest.raises(RecboleLLMError) as raised:
            recommender.recommend(histories, k=3)
        assert message in str(raised.value) and "\n" not in str(raised.value), (histories, str(raised.value))
    for k, message in [(10**5000, "k beyond 10^12 is out of range"), (2.0, "k must be an integer"),
                       ("3", "k must be an integer")]:
        with pytest.raises(RecboleLLMError, match=re.escape(message)):
            recommender.recommend([["1"]], k=k)
    strict = Recommender(artifact, unknown_tokens="error")
    with pytest.raises(RecboleLLMError) as raised:
        strict.recommend([["1", "no\nsuch\ud800"]])
    assert "(first: 'no\\nsuch\\ud800')" in str(raised.value)
    # lists, tuples and numpy arrays of strings or integers are histories
    want = recommender.recommend([["1", "2", "3"]], k=5)
    for same_histories in ([("1", "2", "3")], (["1", "2", "3"],), [[1, 2, 3]], [np.array([1, 2, 3])],
                           np.array([["1", "2", "3"]]), [[np.int64(1), "2", 3]]):
        assert recommender.recommend(same_histories, k=5) == want, same_histories


# ------------------------------------------------------------------------------------------------------
# every file of an artifact is vouched for by its graph (issue 33)


@pytest.fixture(scope="module")
def catalogue_artifact(serving_artifacts) -> str:
    """An artifact exported with --item-index from a model with item text: item_vectors.npy, text_tower.onnx
    and tokenizer.json beside the graph."""
    return serving_artifacts["catalogue"]


def copied(source: str, folder: Path) -> Path:
    import shutil

    shutil.copytree(source, folder)
    return folder


def refused(folder: Path, *words: str) -> str:
    """Recommender(folder) fails with one line naming the fix and holding ``words``; the message."""
    with pytest.raises(RecboleLLMError) as raised:
        Recommender(folder)
    message = str(raised.value)
    assert all(word in message for word in words) and "\n" not in message and "export" in message, message
    return message


def rewrite_metadata(folder: Path, change) -> None:
    metadata = json.loads((folder / "metadata.json").read_text())
    change(metadata)
    (folder / "metadata.json").write_text(json.dumps(metadata))


def swap_two(tokens: list[str]) -> None:
    tokens[1], tokens[2] = tokens[2], tokens[1]


META_EDITS = [
    # (which artifact, the edit, words of the refusal)
    ("catalogue", lambda m: swap_two(m["item_tokens"]), "lists other item_tokens than"),
    ("catalogue", lambda m: m["item_tokens"].__setitem__(5, "renamed"), "lists other item_tokens than"),
    ("catalogue", lambda m: m["text_tower"].__setitem__("item_text_fields", ["class", "movie_title"]),
     "is not the metadata"),
    ("catalogue", lambda m: m["text_tower"].__setitem__("max_tokens", 8), "is not the metadata"),
    ("catalogue", lambda m: m.__setitem__("exclude_seen", not m["exclude_seen"]), "is not the metadata"),
    ("scores", lambda m: m.__setitem__("repeat_rate", 0.5), "is not the metadata"),
    ("scores", lambda m: m.__setitem__("dataset", "ml-other"), "is not the metadata"),
    ("scores", lambda m: m.__setitem__("extra", 1), "is not the metadata"),
    ("scores", lambda m: m["validation"][0].__setitem__("passed", False), "is not the metadata"),
    ("scores", lambda m: m["validation"][0].__setitem__("max_abs_diff", float("nan")), "is not the metadata"),
]


@pytest.mark.parametrize("which, change, words", META_EDITS, ids=[f"{w}-{i}" for i, (w, _, _) in enumerate(META_EDITS)])
def test_an_edited_metadata_json_is_refused_for_every_kind_of_artifact(which, change, words, catalogue_artifact,
                                                                      artifact, tmp_path):
    """Swapping two item tokens of an --item-index artifact used to load and answer every use of either item
    with the other; now any change of value in metadata.json is refused, naming it and the fix."""
    folder = copied(catalogue_artifact if which == "catalogue" else artifact, tmp_path / "a")
    rewrite_metadata(folder, change)
    refused(folder, str(folder / "metadata.json"), words)


@pytest.mark.slow
def test_a_reformatted_metadata_json_keeps_its_meaning_and_loads(catalogue_artifact, tmp_path):
    folder = copied(catalogue_artifact, tmp_path / "a")
    metadata = json.loads((folder / "metadata.json").read_text())
    reordered = dict(reversed(list(metadata.items())))
    (folder / "metadata.json").write_text(json.dumps(reordered, indent=7, ensure_ascii=False))
    assert Recommender(folder).recommend([["1", "2"]], k=3) == Recommender(catalogue_artifact).recommend([["1", "2"]], k=3)


def flip_a_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def swapped_rows(path: Path) -> None:
    table = np.load(path)
    table[[1, 2]] = table[[2, 1]]  # the same size, the same shape, valid values: another item order
    np.save(path, table)


COMPANION_EDITS = [
    ("item_vectors.npy", swapped_rows, "SHA-256 differs"),
    ("item_vectors.npy", lambda p: p.write_bytes(p.read_bytes()[:-4]), "bytes, not the"),
    ("text_tower.onnx", lambda p: flip_a_byte(p, p.stat().st_size // 2), "is not the file its model.onnx was signed with"),
    ("tokenizer.json", lambda p: p.write_text(p.read_text().replace('"[UNK]"', '"[UNQ]"', 1)),
     "is not the file its model.onnx was signed with"),
    ("tokenizer.json", lambda p: p.write_text(p.read_text() + " "), "bytes, not the"),
    ("text_tower.onnx", lambda p: p.unlink(), "is missing"),
]


@pytest.mark.parametrize("name, change, words", COMPANION_EDITS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(COMPANION_EDITS)])
def test_a_companion_file_changed_is_refused_naming_it(name, change, words, catalogue_artifact, tmp_path):
    folder = copied(catalogue_artifact, tmp_path / "a")
    change(folder / name)
    refused(folder, str(folder / name), words)


def special_files(folder: Path, name: str):
    """(what, make): ways ``folder / name`` can be something other than a regular file."""
    import os

    path = folder / name
    return [
        ("a FIFO", lambda: (path.unlink(), os.mkfifo(path))),
        ("a character device (through a link)", lambda: (path.unlink(), path.symlink_to("/dev/zero"))),
        ("a directory", lambda: (path.unlink(), path.mkdir())),
        ("is missing (a link to nothing)", lambda: (path.unlink(), path.symlink_to(folder / "nowhere"))),
    ]


LOAD_IN_A_SUBPROCESS = ("import sys\nfrom recbole_llm.serving.runtime import Recommender\nfrom recbole_llm.errors import "
                        "RecboleLLMError\ntry:\n    Recommender(sys.argv[1])\nexcept RecboleLLMError as e:\n"
                        "    print(e)\n    sys.exit(2)\n")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["item_vectors.npy", "text_tower.onnx", "tokenizer.json"])
def test_a_companion_that_is_not_a_regular_file_is_refused_before_it_is_opened(name, catalogue_artifact, tmp_path):
    """A FIFO or a link to /dev/zero hung serve and add-items (the file was hashed before its type or size was
    looked at). Loaded in a subprocess with a deadline, so a regression fails instead of hanging the suite."""
    for number, (what, make) in enumerate(special_files(Path("."), name)):
        folder = copied(catalogue_artifact, tmp_path / f"a{number}")
        dict(special_files(folder, name))[what]()
        start = time.monotonic()
        run = subprocess.run([sys.executable, "-c", LOAD_IN_A_SUBPROCESS, str(folder)], capture_output=True,
                             text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert run.returncode == 2 and run.stdout.count("\n") == 1, (what, run.stdout, run.stderr[-2000:])
        assert str(folder / name) in run.stdout and what in run.stdout and "export" in run.stdout, run.stdout
        assert time.monotonic() - start < 100


@pytest.mark.slow
@pytest.mark.parametrize("name", ["metadata.json", "model.onnx"])
def test_metadata_and_graph_that_are_not_regular_files_are_named(name, artifact, tmp_path):
    for number, (what, make) in enumerate(special_files(Path("."), name)):
        folder = copied(artifact, tmp_path / f"a{number}")
        dict(special_files(folder, name))[what]()
        run = subprocess.run([sys.executable, "-c", LOAD_IN_A_SUBPROCESS, str(folder)], capture_output=True,
                             text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert run.returncode == 2 and run.stdout.count("\n") == 1, (what, run.stdout, run.stderr[-2000:])
        assert str(folder / name) in run.stdout and what in run.stdout, run.stdout


@pytest.mark.slow
def test_serve_and_add_items_exit_at_once_on_a_fifo_item_table(catalogue_artifact, tmp_path):
    import os

    folder = copied(catalogue_artifact, tmp_path / "a")
    (folder / "item_vectors.npy").unlink()
    os.mkfifo(folder / "item_vectors.npy")
    items = tmp_path / "new.tsv"
    items.write_text("item_id\tmovie_title\tclass\nnew-1\tA New Film (2031)\tDrama\n")
    commands = [["serve", str(folder), "--port", str(free_port())],
                ["add-items", str(folder), str(items), "--output", str(tmp_path / "grown")],
                ["add-items", str(folder), str(items)]]
    for command in commands:
        run = subprocess.run([sys.executable, "-m", "recbole_llm", *command], capture_output=True, text=True,
                             timeout=120, stdin=subprocess.DEVNULL)
        assert run.returncode == 2 and "Traceback" not in run.stderr, (command, run.stderr[-2000:])
        assert run.stderr.count("\n") == 1 and "is a FIFO, not a regular file" in run.stderr, run.stderr
    assert not (tmp_path / "grown").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a", "new.tsv"]


@pytest.mark.slow
def test_add_items_signs_the_grown_catalogue_and_its_edits_are_refused(catalogue_artifact, tmp_path):
    """add-items rewrites the graph's signature for the catalogue it saves: the grown artifact loads (in a
    fresh process: nothing cached), answers with the new item, and is refused once edited like any other."""
    items = tmp_path / "new.tsv"
    items.write_text("item_id\tmovie_title\tclass\nnew-1\tA New Film (2031)\tDrama\nnew-2\tAnother (2032)\tComedy\n")
    grown = tmp_path / "grown"
    run = subprocess.run([sys.executable, "-m", "recbole_llm", "add-items", catalogue_artifact, str(items),
                          "--output", str(grown)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = Recommender(grown)
    assert loaded.tokens[-2:] == ["new-1", "new-2"] and loaded.metadata["items_added"] == 2
    assert loaded.signed_files["item_vectors.npy"]["sha256"] == loaded.metadata["item_index"]["sha256"]
    original = Recommender(catalogue_artifact)
    assert loaded.signed_files["text_tower.onnx"] == original.signed_files["text_tower.onnx"]
    assert loaded.signed_files["item_vectors.npy"] != original.signed_files["item_vectors.npy"]
    assert np.array_equal(loaded.item_vectors[: len(original.tokens)], original.item_vectors)
    # the graph itself is unchanged: only its metadata_props were rewritten
    onnx = pytest.importorskip("onnx")
    before, after = onnx.load(str(Path(catalogue_artifact) / "model.onnx")), onnx.load(str(grown / "model.onnx"))
    assert before.graph == after.graph and before.opset_import == after.opset_import
    assert json.loads({p.key: p.value for p in after.metadata_props}["n_items"]) == len(original.tokens) + 2
    # swapping the two new items, or pairing the grown metadata with the original table, is refused
    edited = copied(str(grown), tmp_path / "edited")
    rewrite_metadata(edited, lambda m: m["item_tokens"].__setitem__(slice(-2, None), ["new-2", "new-1"]))
    refused(edited, "lists other item_tokens than")
    mixed = copied(str(grown), tmp_path / "mixed")
    (mixed / "item_vectors.npy").write_bytes((Path(catalogue_artifact) / "item_vectors.npy").read_bytes())
    refused(mixed, str(mixed / "item_vectors.npy"))


@pytest.mark.slow
def test_saving_refuses_a_companion_changed_since_the_load_and_writes_nothing(catalogue_artifact, tmp_path):
    folder = copied(catalogue_artifact, tmp_path / "a")
    recommender = Recommender(folder)
    recommender.add_items({"new-1": "A New Film (2031), Drama"})
    flip_a_byte(folder / "text_tower.onnx", 1000)
    with pytest.raises(RecboleLLMError, match="text_tower.onnx' is not the file its model.onnx was signed with"):
        recommender.save(tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*partial*"))


def test_an_artifact_exported_before_signatures_is_refused_in_one_line(artifact, tmp_path):
    """A graph carrying metadata.json's keys but no signature (what earlier releases wrote) cannot vouch for
    its files: one line saying to export again."""
    from recbole_llm.artifact import signed_graph

    folder = copied(artifact, tmp_path / "a")
    metadata = json.loads((folder / "metadata.json").read_text())
    unsigned = signed_graph((folder / "model.onnx").read_bytes(), metadata, {})
    onnx = pytest.importorskip("onnx")
    model = onnx.load_from_string(unsigned)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in ("metadata_sha256", "files")]
    del model.metadata_props[:]
    for key, value in kept:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(folder / "model.onnx"))
    refused(folder, "does not vouch for", "exported by an earlier recbole_llm")


def test_the_signature_rewrite_keeps_every_other_field_of_the_graph(artifact):
    """signed_graph edits the protobuf's top level by hand (serving installs have no onnx package): what
    onnx parses back is the same model with the new metadata_props."""
    onnx = pytest.importorskip("onnx")
    from recbole_llm.artifact import ArtifactError, metadata_digest, signed_graph

    data = (Path(artifact) / "model.onnx").read_bytes()
    metadata = {"format_version": 2, "note": "text with \u00e9 and \"quotes\"", "n": [1, 2]}
    resigned = onnx.load_from_string(signed_graph(data, metadata, {}))
    original = onnx.load_from_string(data)
    assert resigned.graph == original.graph and resigned.ir_version == original.ir_version
    props = {p.key: p.value for p in resigned.metadata_props}
    assert props == {"format_version": "2", "note": metadata["note"], "n": "[1, 2]", "files": "{}",
                     "metadata_sha256": metadata_digest(metadata)}
    with pytest.raises(ArtifactError, match="truncated"):
        signed_graph(data[:-3], metadata, {})
