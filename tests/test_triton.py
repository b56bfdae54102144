"""recbole-llm serve --engine triton: a real Triton Inference Server (the tritonserver and Python backend that
PyTriton's wheel ships, running our model) in its own process, started by the command line, asked in Triton's
own protocol over HTTP and gRPC with tritonclient. One server for the module; its last server test stops it
with SIGTERM. The model's logic is also called directly, without Triton."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from recbole_llm.serving.runtime import Recommender

from helpers import assert_one_line_error, free_port

pytest.importorskip("pytriton", reason="PyTriton is not installed: pip install 'recbole_llm[triton]'")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "recommend"
MAX_BATCH, MAX_HISTORY = 8, 100
MARK = "RECBOLE_LLM_TEST_MARK"  # in the environment of every process a server starts: what is left is found by it


def processes_marked(mark: str) -> list[int]:
    """Processes whose environment holds ``MARK=mark`` (the server, tritonserver, the backend's stub)."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                pass
    return found


def serve_command(artifact: str, *options: str) -> list[str]:
    return [sys.executable, "-m", "recbole_llm", "serve", artifact, "--engine", "triton", *options]


def marked_environment(mark: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", MARK: mark, **extra}


class TritonServer:
    def __init__(self, artifact: str, *options: str):
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.mark = uuid.uuid4().hex
        self.clients: list = []  # closed before the server stops: an open connection holds Triton's drain open
        self.process = subprocess.Popen(
            serve_command(artifact, "--port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port",
                          str(self.metrics), *options),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=marked_environment(self.mark))
        client = self.client("http")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited: {self.process.stderr.read()[-3000:]}")
            try:
                if client.is_server_ready() and client.is_model_ready(MODEL):
                    return
            except (InferenceServerException, OSError):
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError("Triton was not ready within 120 s")

    def client(self, protocol: str):
        if protocol == "http":
            client = httpclient.InferenceServerClient(f"127.0.0.1:{self.http}", network_timeout=60)
        else:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc}")
        self.clients.append(client)
        return client

    def stop(self) -> int:
        for client in self.clients:
            client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def pad(histories: list[list[str]], width: int | None = None) -> np.ndarray:
    """Histories as Triton's BYTES tensor [rows, width]: UTF-8 tokens, right-padded with empty strings."""
    width = width or max(len(history) for history in histories)
    tensor = np.full((len(histories), width), b"", dtype=object)
    for row, history in enumerate(histories):
        tensor[row, : len(history)] = [token.encode() for token in history]
    return tensor


def infer(client, module, histories, ks=None, exclude_seen=None, width=None, tensors=None):
    """One request: the answer's (items as strings without padding, scores, unknown_tokens) per row."""
    if tensors is None:
        tensors = {"histories": pad(histories, width)}
        if ks is not None:
            tensors["k"] = np.array(ks, dtype=np.int32).reshape(-1, 1)
        if exclude_seen is not None:
            tensors["exclude_seen"] = np.array(exclude_seen, dtype=bool).reshape(-1, 1)
    inputs = []
    for name, (array, datatype) in ((n, v if isinstance(v, tuple) else (v, None)) for n, v in tensors.items()):
        datatype = datatype or {"O": "BYTES", "i": "INT32", "b": "BOOL"}[array.dtype.kind]
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(MODEL, inputs)
    items, scores, unknown = (result.as_numpy(name) for name in ("items", "scores", "unknown_tokens"))
    assert items.shape == scores.shape and unknown.shape == (len(items), 1)
    rows = []
    for row_items, row_scores, row_unknown in zip(items, scores, unknown):
        kept = row_items != b""
        assert (kept == np.isfinite(row_scores)).all() and list(kept) == sorted(kept, reverse=True)  # padding ends rows
        rows.append({"items": [t.decode() for t in row_items[kept]], "scores": row_scores[kept].tolist(),
                     "unknown_tokens": int(row_unknown[0])})
    return rows


def same(got: list[dict], want) -> bool:
    """Exact tokens, scores within 1e-5 of the runtime's."""
    return len(got) == len(want) and all(
        g["items"] == w.items and g["unknown_tokens"] == w.unknown_tokens
        and np.allclose(g["scores"], w.scores, rtol=0, atol=1e-5) for g, w in zip(got, want))


@pytest.fixture(scope="module")
def server(artifact):
    running = TritonServer(artifact, "--unknown-tokens", "error", "--max-batch", str(MAX_BATCH), "--max-history",
                           str(MAX_HISTORY))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def local(artifact) -> Recommender:
    return Recommender(artifact, unknown_tokens="error")


def runtime(local: Recommender, histories, ks, exclude_seen):
    return [local.recommend([h], k=k, exclude_seen=e)[0] for h, k, e in zip(histories, ks, exclude_seen)]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_answers_over_http_and_grpc_are_the_runtimes(server, local, protocol):
    module = httpclient if protocol == "http" else grpcclient
    client = server.client(protocol)
    tokens = local.tokens
    histories = [tokens[1:6], tokens[10:11], tokens[20:45], tokens[3:5]]
    ks, exclude_seen = [5, 1, 12, 3], [True, False, True, False]
    got = infer(client, module, histories, ks, exclude_seen)
    assert same(got, runtime(local, histories, ks, exclude_seen)), got
    # k and exclude_seen left out: the HTTP service's defaults, 10 and the artifact's
    got = infer(client, module, histories[:2])
    assert same(got, local.recommend(histories[:2], k=10))
    # fewer items left than k: the row ends in padding (items "", scores -inf), as the runtime's answer is shorter
    (short,) = infer(client, module, histories[:1], [local.max_k], [True])
    assert same([short], local.recommend(histories[:1], k=local.max_k, exclude_seen=True))
    assert len(short["items"]) == local.max_k - len(histories[0])


def test_triton_serves_its_own_health_metadata_and_metrics(server):
    client = server.client("http")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    metadata = client.get_model_metadata(MODEL)
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("histories", "BYTES", [-1, -1]), ("k", "INT32", [-1, 1]), ("exclude_seen", "BOOL", [-1, 1])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [
        ("items", "BYTES", [-1, -1]), ("scores", "FP32", [-1, -1]), ("unknown_tokens", "INT32", [-1, 1])]
    config = client.get_model_config(MODEL)
    assert config["max_batch_size"] == MAX_BATCH and "dynamic_batching" in config
    assert server.client("grpc").is_model_ready(MODEL)
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=30) as response:
        metrics = response.read().decode()
    assert f'nv_inference_request_success{{model="{MODEL}",version="1"}}' in metrics


def metric(server, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f'{name}{{model="{MODEL}",version="1"}}'):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")



def burst(server, send, requests, check) -> int:
    """Send ``requests`` from 16 threads at once (``send(request)`` -> answer), ``check(answers)`` each time, until
    Triton's model calls were fewer than the requests (some were shared; a loaded machine's clients can be slow
    enough to arrive one by one), at most three times; returns the last burst's model calls."""
    for _ in range(3):
        executions = metric(server, "nv_inference_exec_count")
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(send, requests))
        calls = metric(server, "nv_inference_exec_count") - executions
        check(answers)
        if calls < len(requests):
            break
    return calls


def test_concurrent_clients_get_their_own_answers(server, local):
    """Requests of one width batch together in Triton; every client still gets its own rows, with its own k."""
    tokens = local.tokens
    requests = [([tokens[1 + i : 2 + i + i % 9], tokens[40 + i : 41 + i + i % 3]], [1 + i % 10, 1 + (i * 7) % 13],
                 [i % 2 == 0, i % 3 == 0]) for i in range(48)]

    def ask(request):
        histories, ks, exclude_seen = request
        return infer(server.client("http"), httpclient, histories, ks, exclude_seen, width=12)

    def check(answers):
        for (histories, ks, exclude_seen), got in zip(requests, answers):
            assert same(got, runtime(local, histories, ks, exclude_seen)), (histories, ks, got)

    assert burst(server, ask, requests, check) < len(requests)  # some calls were shared


def one_line(message: str) -> bool:
    return "\n" not in message.strip() and "Traceback" not in message


def ask(server, request) -> list[dict] | str:
    """One request over its own HTTP client: its rows, or its error's text."""
    try:
        return infer(server.client("http"), httpclient, *request)
    except InferenceServerException as refused:
        return str(refused)


def test_a_bad_request_fails_alone_among_good_ones_in_the_same_calls(server, local):
    """Good and bad requests sent together share Triton's model calls; each bad one gets its own one-line
    error, each good one its exact answer (PyTriton's proxy failed the whole call)."""
    tokens = local.tokens
    bad = [([["1", "no-such-item"]], None, None), ([["1", "2"]], [local.max_k + 1], None), ([["1"], []], None, None)]
    messages = ["unknown item tokens (first: 'no-such-item')", f"k={local.max_k + 1} is out of range",
                "history 1 is empty"]
    requests = [bad[i // 3 % 3] if i % 3 == 2 else
                ([tokens[1 + i : 2 + i + i % 7], tokens[30 + i : 31 + i + i % 4]], [1 + i % 9, 2 + i % 5], [i % 2 == 0] * 2)
                for i in range(60)]

    def check(answers):
        for i, (request, got) in enumerate(zip(requests, answers)):
            if i % 3 == 2:
                assert isinstance(got, str) and messages[i // 3 % 3] in got and one_line(got), got
            else:
                assert not isinstance(got, str), got
                assert same(got, runtime(local, *request)), (request, got)

    calls = burst(server, lambda request: ask(server, request), requests, check)
    assert calls < len(requests), calls  # calls were shared, so bad requests sat beside good ones


def test_requests_of_different_widths_share_calls(server, local):
    """histories is ragged: single-history requests of 48 widths, none padded to another's, still share
    model calls."""
    tokens = local.tokens
    requests = [([tokens[1 + width : 1 + 2 * width]], [5], [True]) for width in range(1, 49)]
    def check(answers):
        for request, got in zip(requests, answers):
            assert not isinstance(got, str) and same(got, runtime(local, *request)), (request, got)

    calls = burst(server, lambda request: ask(server, request), requests, check)
    assert calls < len(requests), calls  # a call held two requests, hence two widths


def bad_requests(local: Recommender) -> list[tuple[dict, str]]:
    one = pad([["1", "2"]])
    return [
        ({"histories": (np.array([[1, 2]], dtype=np.int64), "INT64")}, "histories"),  # wrong dtype
        ({"histories": one, "k": np.array([[3, 4]], dtype=np.int32)}, "k"),  # wrong shape
        ({"histories": (np.array([b"1", b"2"], dtype=object), "BYTES")}, "histories"),  # no batch dimension
        ({"histories": pad([["1", "no-such-item"]])}, "unknown item tokens (first: 'no-such-item')"),
        ({"histories": one, "k": np.array([[0]], dtype=np.int32)}, "k=0 is out of range"),
        ({"histories": one, "k": np.array([[local.max_k + 1]], dtype=np.int32)},
         f"k={local.max_k + 1} is out of range; this artifact returns 1 to {local.max_k} items"),
        ({"histories": np.full((1, 3), b"", dtype=object)}, "history 0 is empty"),
        ({"histories": pad([["1"], []])}, "history 1 is empty"),
        ({"histories": pad([["1"]] * (MAX_BATCH + 1))}, f"batch-size must be <= {MAX_BATCH}"),  # Triton's own bound: --max-batch
        ({"histories": pad([["1"] * (MAX_HISTORY + 1)])}, f"history 0 has {MAX_HISTORY + 1} items; the limit is"),
        ({"histories": np.array([[b"\xff\xfe"]], dtype=object)}, "is not UTF-8"),
    ]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_triton_errors_and_the_server_keeps_answering(server, local, protocol):
    module = httpclient if protocol == "http" else grpcclient
    client = server.client(protocol)
    good = [["1", "2", "3"], ["50"]]
    before = infer(client, module, good, [4, 2])
    for tensors, message in bad_requests(local):
        with pytest.raises(InferenceServerException) as refused:
            infer(client, module, None, tensors=tensors)
        assert message in str(refused.value), (tensors, str(refused.value)[-600:])
        assert one_line(str(refused.value))
    assert infer(client, module, good, [4, 2]) == before
    assert server.process.poll() is None


def test_sigterm_stops_the_server_cleanly_and_leaves_nothing_running(server):
    """The module's last test: its server exits 0 on SIGTERM, tritonserver and the backend's stub with it."""
    assert len(processes_marked(server.mark)) >= 3  # the command, tritonserver, the Python backend's stub
    started = time.monotonic()
    assert server.stop() == 0, server.process.stderr.read()[-3000:]
    assert time.monotonic() - started < 10  # within --shutdown-timeout: nothing was left in flight
    deadline = time.monotonic() + 10
    while processes_marked(server.mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_marked(server.mark) == []


def failed_start(tmp_path, artifact: str, *options: str, **extra_env: str) -> subprocess.CompletedProcess:
    mark = uuid.uuid4().hex
    result = subprocess.run(serve_command(artifact, *options), capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL, env=marked_environment(mark, **extra_env))
    assert processes_marked(mark) == []  # nothing left running
    return result


def test_serve_without_pytriton_says_what_to_install(tmp_path):
    shim = tmp_path / "shim" / "pytriton"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'pytriton'\")\n")
    path = os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")])
    result = failed_start(tmp_path, str(tmp_path), "--port", str(free_port()), PYTHONPATH=path)
    assert_one_line_error(result, "--engine triton needs PyTriton", "pip install 'recbole_llm[triton]'")


def test_serve_refuses_a_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = failed_start(tmp_path, str(tmp_path), "--port", str(free_port()), "--grpc-port", str(port))
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}")


def test_serve_refuses_an_artifact_that_does_not_load(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    (tmp_path / "metadata.json").write_text("{}")
    result = failed_start(tmp_path, str(tmp_path), "--port", str(free_port()), "--grpc-port", str(free_port()),
                          "--metrics-port", str(free_port()))
    assert_one_line_error(result, "metadata.json")


def test_options_of_the_other_engine_are_refused(tmp_path):
    result = failed_start(tmp_path, str(tmp_path), "--no-batching")
    assert_one_line_error(result, "--no-batching applies to the FastAPI service only")
    result = subprocess.run([sys.executable, "-m", "recbole_llm", "serve", str(tmp_path), "--grpc-port", "9001"],
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "--grpc-port applies to --engine triton only")


def test_the_server_gets_this_interpreters_libpython_python_and_package_first():
    """The Python backend's stub loads libpython by name and finds its site-packages through ``python3`` on
    PATH: where this interpreter's own library is not in a system folder (pyenv, as on the project's machines),
    its folder goes first on LD_LIBRARY_PATH (the wheel's libraries last), its bin first on PATH, and the
    folder this recbole_llm comes from first on PYTHONPATH."""
    import sysconfig

    import recbole_llm
    from recbole_llm.serving.triton import python_library_folder, server_environment

    folder = python_library_folder()
    environ = {"LD_LIBRARY_PATH": f"/opt/a:/opt/b:{folder or '/opt/a'}", "PATH": "/usr/bin", "OTHER": "kept"}
    env = server_environment(environ, "/wheel/libs")
    assert environ["PATH"] == "/usr/bin" and env["OTHER"] == "kept"  # a copy
    head = [folder] if folder else []
    assert env["LD_LIBRARY_PATH"] == os.pathsep.join([*head, "/opt/a", "/opt/b", "/wheel/libs"])
    if folder is not None:
        assert Path(folder, sysconfig.get_config_var("INSTSONAME")).is_file()
    assert env["PATH"] == os.pathsep.join([str(Path(sys.exec_prefix) / "bin"), "/usr/bin"])
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(recbole_llm.__file__).resolve().parents[1])
    assert server_environment(env, "/wheel/libs") == env  # nothing twice


def test_the_model_answers_each_request_on_its_own_in_one_rank_call(local, monkeypatch):
    """The backend's logic without Triton: the good requests' rows ranked in one call, each bad request
    answered by its own error."""
    from recbole_llm.serving.requests import Limits, RequestError
    from recbole_llm.serving.triton_model import answer

    ranked = []
    rank = local.rank
    monkeypatch.setattr(local, "rank", lambda encoded, ks, *rest: ranked.append(list(ks)) or rank(encoded, ks, *rest))
    tokens = local.tokens
    histories = [[tokens[1:4], tokens[7:8]], [tokens[9:30]]]
    requests = [{"histories": pad(histories[0]), "k": np.array([[3], [5]], dtype=np.int32)},
                {"histories": pad([["1", "no-such-item"]])},
                {"histories": pad(histories[1], width=40), "exclude_seen": np.array([[False]])},
                {"histories": pad([["1"]]), "k": np.array([[0]], dtype=np.int32)}]
    limits = Limits(max_batch=MAX_BATCH, max_history=MAX_HISTORY)
    results = answer(requests, local, limits)
    assert ranked == [[3, 5, 10]]  # the good requests' three rows, in one call
    assert isinstance(results[1], RequestError) and "no-such-item" in str(results[1])
    assert isinstance(results[3], RequestError) and "k=0 is out of range" in str(results[3])
    first, second = results[0], results[2]
    assert first["items"].shape == first["scores"].shape == (2, 5) and first["unknown_tokens"].shape == (2, 1)
    assert first["items"][0, 3] == b"" and first["scores"][0, 3] == -np.inf  # row 0 asked for 3 of the 5
    want = runtime(local, histories[0], [3, 5], [local.exclude_seen] * 2)
    assert [[t.decode() for t in row if t] for row in first["items"]] == [w.items for w in want]
    (want,) = runtime(local, histories[1], [10], [False])
    assert [t.decode() for t in second["items"][0]] == want.items
    assert np.allclose(second["scores"][0], want.scores, rtol=0, atol=1e-5)
    ranked.clear()
    (alone,) = answer(requests[3:], local, limits)  # no good request: no model call
    assert isinstance(alone, RequestError) and ranked == []


def test_the_model_config_is_tritons_and_quotes_any_path():
    """config.pbtxt parses against Triton's own schema; a parameter keeps quotes, backslashes, control
    characters and non-ASCII (an artifact's path may hold any)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from recbole_llm.serving.triton import model_config

    path = 'odd "folder" \\ with\nnewline, tab\t and é'
    text = model_config(7, {"artifact": path, "retrieval": "exact"})
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.max_batch_size == 7 and config.backend == "python" and config.HasField("dynamic_batching")
    assert config.parameters["artifact"].string_value == path
    histories, k, exclude_seen = config.input
    assert histories.allow_ragged_batch and k.optional and exclude_seen.optional


def test_a_model_that_fails_to_load_in_triton_is_one_line_and_nothing_is_left(tmp_path, monkeypatch):
    """The artifact loaded in the command's process but Triton's stub could not load the model: one line
    (the stub's exception, without its traceback), tritonserver and the stub gone."""
    from recbole_llm.errors import RecboleLLMError
    from recbole_llm.serving.triton import model_config, run_triton, triton_files, write_repository

    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)
    files = triton_files()
    broken = ("from recbole_llm.errors import ArtifactError\n\n\nclass TritonPythonModel:\n"
              "    def initialize(self, args):\n        raise ArtifactError('model.onnx vanished\\nsecond line')\n")
    write_repository(tmp_path, files, model_config(4, {"artifact": "x"}), broken)
    with pytest.raises(RecboleLLMError) as failed:
        run_triton(files, tmp_path, "127.0.0.1", {"http": free_port(), "grpc": free_port(), "metrics": free_port()}, 5)
    message = str(failed.value)
    assert "Triton did not start" in message and "ArtifactError: model.onnx vanished" in message, message
    assert one_line(message) and "second line" not in message, message
    assert processes_marked(mark) == []


def test_stubs_left_behind_by_a_late_stop_are_killed_and_their_shared_memory_removed(tmp_path):
    """A stub that outlives tritonserver (stopped past --shutdown-timeout with requests running) is found by the
    shared-memory prefix on its command line, killed, and its regions removed; other processes are left alone."""
    from recbole_llm.serving.triton import remove_leftovers, shm_prefix

    prefix = shm_prefix(999_999_991)
    stub = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                             "signal.SIG_IGN); time.sleep(120)", f"{prefix}region"])  # deaf to SIGTERM, as seen
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "recbole_llm_other_"])
    region = Path("/dev/shm") / f"{prefix}region"
    region.write_bytes(b"x")
    try:
        assert remove_leftovers(prefix) == 1
        assert stub.wait(timeout=10) == -9 and not region.exists() and bystander.poll() is None
    finally:
        for process in (stub, bystander):
            process.kill()
            process.wait()
        region.unlink(missing_ok=True)
