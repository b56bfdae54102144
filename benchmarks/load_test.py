"""Load test of ``recbole-llm serve`` on loopback: concurrent clients, a fixed number of requests.

    python benchmarks/inference.py     # first: trains and exports the artifact served here
    python benchmarks/load_test.py     # writes benchmarks/results/load_test.{json,md}
    python benchmarks/load_test.py --artifact DIR --requests 10000 --clients 16

The service runs in its own process (``python -m recbole_llm serve``, 127.0.0.1). Each client thread keeps
one HTTP connection open and sends requests drawn from a pool of 500 (1-3 histories of 1-50 random item
tokens, k from 1 to 20, exclude_seen on or off); every answer is checked against the runtime called
directly in this process. Reported: throughput, p50 / p99 latency, errors, wrong answers, the service's
resident memory after warm-up and at the end, and model calls per request. The same test with
``--no-batching`` (one ONNX Runtime call per request) shows what batching concurrent requests buys.

``--triton`` compares the engines instead (``load_test_triton.{json,md}``): the FastAPI service and
``recbole-llm serve --engine triton`` (needs ``pip install -e ".[triton]"``), each in its own process, under the
same requests and clients; Triton's clients are tritonclient HTTP clients sending the KServe v2 tensors, the
histories of a request padded to its own longest (the model's histories input is ragged: Triton batches
requests of any widths together). Server memory is the RSS of the server's process tree (tritonserver and the Python backend's stub
included).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SCRATCH, provenance, write_results  # noqa: E402

DEFAULT_ARTIFACT = SCRATCH / "inference_cpu" / "ort-optimized"
WARMUP_REQUESTS = 200


def make_pool(tokens: list[str], size: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    items = tokens[1:]  # 0 is padding
    return [
        {
            "histories": [rng.sample(items, rng.randint(1, 50)) for _ in range(rng.choice((1, 1, 1, 2, 3)))],
            "k": rng.randint(1, 20),
            "exclude_seen": rng.random() < 0.7,
        }
        for _ in range(size)
    ]


def same(got: list[dict], want: list[dict]) -> bool:
    """Same items in the same order; scores equal to float32 rounding (a shared call may sum in another order)."""
    return len(got) == len(want) and all(
        g["items"] == w["items"]
        and np.allclose(g["scores"], w["scores"], rtol=1e-5, atol=1e-5)
        and g["unknown_tokens"] == w["unknown_tokens"]
        for g, w in zip(got, want)
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and every process below it (Triton: the command, tritonserver, the backend's stub)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += rss_mb(current)
        except OSError:  # gone meanwhile
            pass
        todo.extend(children.get(current, []))
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


class HttpExchange:
    """The FastAPI service's client: one keep-alive connection, JSON bodies."""

    def __init__(self, port: int, pool: list[dict]):
        self.port = port
        self.bodies = [json.dumps(p).encode() for p in pool]

    def connect(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def send(self, connection, index: int) -> tuple[int, object]:
        connection.request("POST", "/recommend", body=self.bodies[index],
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = json.loads(response.read())
        return response.status, payload["recommendations"] if response.status == 200 else payload

    errors = (OSError, http.client.HTTPException, json.JSONDecodeError)


class TritonExchange:
    """Triton's client: tritonclient over HTTP (KServe v2), a request's histories padded to its longest (the
    input is ragged: requests of different widths share model calls)."""

    def __init__(self, port: int, pool: list[dict]):
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        self.httpclient, self.port, self.pool = httpclient, port, pool
        self.errors = (OSError, InferenceServerException)

    def connect(self):
        return self.httpclient.InferenceServerClient(f"127.0.0.1:{self.port}", network_timeout=60)

    def send(self, client, index: int) -> tuple[int, object]:
        request = self.pool[index]
        rows = len(request["histories"])
        width = max(len(history) for history in request["histories"])
        histories = np.full((rows, width), b"", dtype=object)
        for row, history in enumerate(request["histories"]):
            histories[row, : len(history)] = [token.encode() for token in history]
        tensors = {"histories": (histories, "BYTES"),
                   "k": (np.full((rows, 1), request["k"], dtype=np.int32), "INT32"),
                   "exclude_seen": (np.full((rows, 1), request["exclude_seen"], dtype=bool), "BOOL")}
        inputs = []
        for name, (array, datatype) in tensors.items():
            tensor = self.httpclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = client.infer("recommend", inputs)
        items, scores, unknown = (result.as_numpy(n) for n in ("items", "scores", "unknown_tokens"))
        kept = items != b""
        return 200, [{"items": [t.decode() for t in i[m]], "scores": s[m].tolist(), "unknown_tokens": int(u[0])}
                     for i, s, u, m in zip(items, scores, unknown, kept)]


def load(exchange, expected: list[list[dict]], requests: int, clients: int, deadline: float) -> dict:
    """``requests`` requests from ``clients`` threads; latencies, errors and wrong answers."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    wrong = [0]
    attempted = [0]

    def client() -> None:
        connection = exchange.connect()
        while time.monotonic() < deadline:
            with lock:
                index = next(counter, None)
            if index is None:
                break
            attempted[0] += 1  # under the lock's protection of the counter above: good enough for a count
            start = time.perf_counter()
            try:
                status, answers = exchange.send(connection, index % len(expected))
                elapsed = time.perf_counter() - start
            except exchange.errors as error:
                with lock:
                    errors.append(f"{type(error).__name__}: {str(error)[:300]}")
                connection.close()
                connection = exchange.connect()
                continue
            ok = status == 200 and same(answers, expected[index % len(expected)])
            with lock:
                latencies.append(elapsed)
                if status != 200:
                    errors.append(f"HTTP {status}: {answers}")
                elif not ok:
                    wrong[0] += 1
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    ms = sorted(1000 * t for t in latencies)
    return {
        "requests": attempted[0],
        "answered": len(latencies),
        "seconds": round(seconds, 1),
        "throughput_rps": round(len(latencies) / seconds, 1),
        "p50_ms": round(statistics.median(ms), 2) if ms else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if ms else None,
        "max_ms": round(ms[-1], 2) if ms else None,
        "errors": len(errors),
        "first_errors": errors[:3],
        "wrong_answers": wrong[0],
    }


def triton_metric(port: int, name: str) -> float:
    """One of Triton's Prometheus counters for the model ``recommend``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    for line in text.splitlines():
        if line.startswith(f'{name}{{model="recommend",version="1"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise SystemExit(f"load_test.py: error: Triton's metrics have no {name}")


def wait_ready(service: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        if service.poll() is not None:
            raise SystemExit(f"{what} exited: {service.stdout.read()}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start within 120 s")
        time.sleep(0.2)


def run_triton(artifact: Path, requests: int, clients: int, pool, expected, max_seconds: float) -> dict:
    """``recbole-llm serve --engine triton`` in its own process under the same load as the FastAPI service."""
    ports = [free_port(), free_port(), free_port()]
    command = [sys.executable, "-m", "recbole_llm", "serve", str(artifact), "--engine", "triton", "--port",
               str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    service = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        exchange = TritonExchange(ports[0], pool)
        probe = exchange.connect()
        wait_ready(service, lambda: probe.is_model_ready("recommend"), "Triton")
        probe.close()
        warmup = load(exchange, expected, WARMUP_REQUESTS, clients, time.monotonic() + 120)
        rss_before = tree_rss_mb(service.pid)
        calls_before = triton_metric(ports[2], "nv_inference_exec_count")
        result = load(exchange, expected, requests, clients, time.monotonic() + max_seconds)
        rss_after = tree_rss_mb(service.pid)
        calls = triton_metric(ports[2], "nv_inference_exec_count") - calls_before
        probe = exchange.connect()
        alive = service.poll() is None and probe.is_server_ready()
        probe.close()
        result.update({
            "engine": "triton", "clients": clients,
            "warmup": {"requests": WARMUP_REQUESTS, "errors": warmup["errors"], "wrong_answers": warmup["wrong_answers"]},
            "service_rss_mb_after_warmup": round(rss_before, 1),
            "service_rss_mb_at_end": round(rss_after, 1),
            "rss_growth_percent": round(100 * (rss_after / rss_before - 1), 2),
            "model_calls": int(calls),
            "requests_per_model_call": round(result["answered"] / max(calls, 1), 2),
            "service_alive_at_end": alive,
        })
        return result
    finally:
        service.terminate()
        result_code = service.wait(timeout=60)
        if result_code != 0:
            print(f"Triton exited with {result_code}", flush=True)


def run_service(artifact: Path, batching: bool, requests: int, clients: int, pool, expected,
                max_seconds: float) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "recbole_llm", "serve", str(artifact), "--port", str(port)]
    if not batching:
        command.append("--no-batching")
    service = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(service, lambda: fetch(port, "GET", "/health")[0] == 200, "service")
        exchange = HttpExchange(port, pool)
        warmup = load(exchange, expected, WARMUP_REQUESTS, clients, time.monotonic() + 120)
        rss_before = tree_rss_mb(service.pid)
        calls_before = fetch(port, "GET", "/metadata")[1]["model_calls"]
        result = load(exchange, expected, requests, clients, time.monotonic() + max_seconds)
        rss_after = tree_rss_mb(service.pid)
        calls = fetch(port, "GET", "/metadata")[1]["model_calls"] - calls_before
        result.update({
            "engine": "fastapi",
            "batching": batching,
            "clients": clients,
            "warmup": {"requests": WARMUP_REQUESTS, "errors": warmup["errors"], "wrong_answers": warmup["wrong_answers"]},
            "service_rss_mb_after_warmup": round(rss_before, 1),
            "service_rss_mb_at_end": round(rss_after, 1),
            "rss_growth_percent": round(100 * (rss_after / rss_before - 1), 2),
            "model_calls": calls,
            "requests_per_model_call": round(result["answered"] / max(calls, 1), 2),
            "service_alive_at_end": service.poll() is None and fetch(port, "GET", "/health")[0] == 200,
        })
        return result
    finally:
        service.terminate()
        service.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACT, help="an exported artifact folder")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--unbatched-requests", type=int, default=2_000, help="requests of the --no-batching run")
    parser.add_argument("--max-seconds", type=float, default=900, help="bound on each run's wall time")
    parser.add_argument("--triton", action="store_true",
                        help="compare the engines: the FastAPI service and --engine triton, same requests and clients "
                             "(writes load_test_triton.{json,md})")
    args = parser.parse_args()
    if not (args.artifact / "model.onnx").is_file():
        raise SystemExit(f"load_test.py: error: no artifact at {args.artifact}; run benchmarks/inference.py "
                         "first or pass --artifact DIR")

    from recbole_llm.serving.runtime import Recommender

    recommender = Recommender(args.artifact)
    pool = make_pool(recommender.tokens, 500)
    expected = [[asdict(a) for a in recommender.recommend(p["histories"], p["k"], p["exclude_seen"])] for p in pool]
    report = {**provenance(), "artifact": str(args.artifact),
              "artifact_model": {k: recommender.metadata[k] for k in ("model", "dataset", "max_length", "precision",
                                                                       "optimized", "n_items")}}
    del recommender  # its ONNX Runtime threads would spin beside the servers on the same cores
    if args.triton:
        compare_engines(args, report, pool, expected)
        return
    print(f"batching on: {args.requests} requests from {args.clients} clients ...", flush=True)
    report["batching"] = run_service(args.artifact, True, args.requests, args.clients, pool, expected,
                                     args.max_seconds)
    print(f"batching off: {args.unbatched_requests} requests ...", flush=True)
    report["no_batching"] = run_service(args.artifact, False, args.unbatched_requests, args.clients, pool,
                                        expected, args.max_seconds)
    b, n = report["batching"], report["no_batching"]
    model = report["artifact_model"]
    lines = [
        f"Measured {report['date']} at commit {report['commit']} on {report['machine']}: `{report['command']}`.",
        "",
        f"Service: `recbole-llm serve` on 127.0.0.1 over {model['model']} ({model['precision']}, optimized "
        f"{model['optimized']}, {model['n_items'] - 1} items, max length {model['max_length']}); "
        f"{args.clients} client threads in another process, keep-alive connections; requests of 1-3 "
        "histories of 1-50 items; every answer compared with the runtime called directly.",
        "",
        "| mode | requests | errors | wrong answers | throughput | p50 | p99 | max | requests per model call | "
        "service RSS after warm-up → end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("batching (default)", b), ("--no-batching", n)):
        lines.append(
            f"| {name} | {r['answered']} | {r['errors']} | {r['wrong_answers']} | {r['throughput_rps']} req/s | "
            f"{r['p50_ms']} ms | {r['p99_ms']} ms | {r['max_ms']} ms | {r['requests_per_model_call']} | "
            f"{r['service_rss_mb_after_warmup']} → {r['service_rss_mb_at_end']} MB ({r['rss_growth_percent']:+.1f}%) |"
        )
    speedup = b["throughput_rps"] / max(n["throughput_rps"], 1e-9)
    ok = (b["answered"] >= 10_000 and b["errors"] == 0 and b["wrong_answers"] == 0
          and b["rss_growth_percent"] < 10 and b["service_alive_at_end"])
    lines += ["", f"Batching concurrent requests: {speedup:.2f}x the throughput of one call per request.",
              f"Target (>= 10,000 requests, 16 clients, zero errors, answers identical, memory growth < 10%): "
              f"{'met' if ok and args.clients >= 16 else 'MISSED'}."]
    write_results("load_test", report, lines)


def compare_engines(args, report: dict, pool: list[dict], expected: list[list[dict]]) -> None:
    """The FastAPI service and Triton, one after the other, each in its own process, under the same load."""
    print(f"FastAPI: {args.requests} requests from {args.clients} clients ...", flush=True)
    report["fastapi"] = run_service(args.artifact, True, args.requests, args.clients, pool, expected,
                                    args.max_seconds)
    print(f"Triton: {args.requests} requests from {args.clients} clients ...", flush=True)
    report["triton"] = run_triton(args.artifact, args.requests, args.clients, pool, expected, args.max_seconds)
    model = report["artifact_model"]
    lines = [
        f"Measured {report['date']} at commit {report['commit']} on {report['machine']}: `{report['command']}`.",
        "",
        f"Both engines over {model['model']} ({model['precision']}, optimized {model['optimized']}, "
        f"{model['n_items'] - 1} items, max length {model['max_length']}) on 127.0.0.1, each in its own process, one "
        f"after the other; {args.clients} client threads in another process on the same cores, keep-alive "
        f"connections; the same {args.requests} requests (1-3 histories of 1-50 items, k 1-20, exclude_seen on or "
        "off) after 200 warm-up requests; every answer compared with the runtime called directly (the same items, "
        "scores within 1e-5). FastAPI: `recbole-llm serve` (JSON, its batcher); Triton: `recbole-llm serve "
        "--engine triton` (our Python-backend model in the tritonserver PyTriton's wheel ships, dynamic batching, "
        "histories ragged), tritonclient HTTP clients sending KServe v2 tensors, each request's histories padded to "
        "its longest. Memory: RSS of the server's process tree (Triton: the command, "
        "tritonserver and the Python backend's stub).",
        "",
        "| engine | requests | errors | wrong answers | throughput | p50 | p99 | max | requests per model call | "
        "server RSS after warm-up → end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("FastAPI (default)", report["fastapi"]), ("Triton (`--engine triton`)", report["triton"])):
        lines.append(
            f"| {name} | {r['answered']} | {r['errors']} | {r['wrong_answers']} | {r['throughput_rps']} req/s | "
            f"{r['p50_ms']} ms | {r['p99_ms']} ms | {r['max_ms']} ms | {r['requests_per_model_call']} | "
            f"{r['service_rss_mb_after_warmup']} → {r['service_rss_mb_at_end']} MB ({r['rss_growth_percent']:+.1f}%) |")
    ratio = report["triton"]["throughput_rps"] / max(report["fastapi"]["throughput_rps"], 1e-9)
    lines += ["", f"Triton's throughput: {ratio:.2f}x the FastAPI service's on this load."]
    write_results("load_test_triton", report, lines)


if __name__ == "__main__":
    main()
