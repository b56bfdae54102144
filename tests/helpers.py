"""Helpers the test modules share: running the command line, a service in its own process, comparing answers.

Plain functions and classes, importable without torch or RecBole (the serving tests run in a serving-only
install too); fixtures live in conftest.py. No test module imports another.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "recbole_llm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,  # a download prompt would hang: fail instead
        stdin=subprocess.DEVNULL,
        env=env,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("recbole-llm: error:")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def slice_args(data_root) -> list[str]:
    return [
        f"--data_path={data_root}",
        "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}",
        "--show_progress=False",
    ]


class Payload:
    """Pickles to a call of os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --max-explained: the runtime's default (Limits), given explicitly while the CLI's own default is 1000
LIMITS = ["--max-batch", "8", "--max-history", "100", "--max-body-bytes", "4096", "--max-explained", "256"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, artifact: str, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "recbole_llm", "serve", artifact, "--port", str(self.port), *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"service exited: {self.process.stdout.read()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("service did not start within 120 s")

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def recommend(self, payload) -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", "/recommend", body)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


class LoggedService(Service):
    """Service, its log (stdout and stderr) read while it runs."""

    def __init__(self, artifact: str, *options: str):
        super().__init__(artifact, *options)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read_log, daemon=True)
        self.reader.start()

    def _read_log(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_log(self, text: str, seconds: float = 10) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if text in self.log:
                return True
            time.sleep(0.05)
        return False

    def connect(self, data: bytes = b"") -> socket.socket:
        client = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        client.sendall(data)
        return client

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        self.reader.join(timeout=10)


def direct(artifact: str, histories, k=10, exclude_seen=True, unknown_tokens="skip") -> list[dict]:
    from recbole_llm.serving.runtime import Recommender

    recommender = Recommender(artifact, unknown_tokens=unknown_tokens)
    return [asdict(a) for a in recommender.recommend(histories, k=k, exclude_seen=exclude_seen)]


def same(got: list[dict], want: list[dict]) -> bool:
    """Same items in the same order, scores equal to float32 rounding: a call that batches several requests
    may sum in another order than a call with one."""
    return len(got) == len(want) and all(
        g["items"] == w["items"] and g["unknown_tokens"] == w["unknown_tokens"]
        and all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(g["scores"], w["scores"]))
        for g, w in zip(got, want)
    )


BAD_REQUESTS = [
    (b'{"histories": [["1", "2"]', 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[1, 2]", 422, "JSON object"),
    ({"histories": [["1"]], "kk": 3}, 422, "unknown field 'kk'"),
    ({"k": 3}, 422, "missing field 'histories'"),
    ({"histories": "1 2 3"}, 422, "non-empty list"),
    ({"histories": []}, 422, "non-empty list"),
    ({"histories": ["1"]}, 422, "history 0 must be a list"),
    ({"histories": [["1", 2.5]]}, 422, "history 0, position 1"),
    ({"histories": [["1", None]]}, 422, "history 0, position 1"),
    ({"histories": [["1"], []]}, 422, "history 1 is empty"),
    ({"histories": [["no-such-item"]]}, 422, "history 0 has no item the model knows"),
    ({"histories": [["1"]], "k": "10"}, 422, "'k' must be an integer"),
    ({"histories": [["1"]], "k": True}, 422, "'k' must be an integer"),
    ({"histories": [["1"]], "k": 0}, 422, "k=0 is out of range"),
    ({"histories": [["1"]], "k": 100000}, 422, "k=100000 is out of range"),
    ({"histories": [["1"]], "exclude_seen": "yes"}, 422, "'exclude_seen' must be true or false"),
    ({"histories": [["1"]], "explain": 1}, 422, "'explain' must be true or false"),
    # the explain limit counts what a request costs: the effects its answer reports (k x items read, per
    # history) at most 100 x --max-explained (256): 8 full windows (12 items) at k=300 report 28,800
    ({"histories": [[str(i) for i in range(1, 13)]] * 8, "k": 300, "explain": True}, 413,
     "explaining this request reports 28800 effects (k=300 recommended items x the items the model reads, per "
     "history); the limit is 25600 (100 x --max-explained): ask for a smaller k or fewer histories, or start the "
     "service with a larger --max-explained"),
    ({"histories": [[str(i) for i in range(1, 40)]] * 8, "k": 300, "explain": True}, 413,
     "reports 28800 effects"),  # items beyond the model's window cost nothing
    ({"histories": [["1"]] * 9}, 413, "9 histories in one request; the limit is 8"),
    ({"histories": [["1"] * 101]}, 413, "history 0 has 101 items; the limit is 100"),
    (b'{"histories": [["1"]], "pad": "' + b"x" * 5000 + b'"}', 413, "the limit is 4096"),
]
