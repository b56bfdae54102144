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
from _common import RESULTS, SCRATCH, provenance, write_results  # noqa: E402

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


def load(port: int, pool: list[bytes], expected: list[list[dict]], requests: int, clients: int,
         deadline: float) -> dict:
    """``requests`` requests from ``clients`` threads; latencies, errors and wrong answers."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    wrong = [0]
    attempted = [0]

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < deadline:
            with lock:
                index = next(counter, None)
            if index is None:
                break
            attempted[0] += 1  # under the lock's protection of the counter above: good enough for a count
            body = pool[index % len(pool)]
            start = time.perf_counter()
            try:
                connection.request("POST", "/recommend", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                payload = json.loads(response.read())
                elapsed = time.perf_counter() - start
            except (OSError, http.client.HTTPException, json.JSONDecodeError) as error:
                with lock:
                    errors.append(f"{type(error).__name__}: {error}")
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            ok = response.status == 200 and same(payload["recommendations"], expected[index % len(pool)])
            with lock:
                latencies.append(elapsed)
                if response.status != 200:
                    errors.append(f"HTTP {response.status}: {payload}")
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


def run_service(artifact: Path, batching: bool, requests: int, clients: int, pool, expected,
                max_seconds: float) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "recbole_llm", "serve", str(artifact), "--port", str(port)]
    if not batching:
        command.append("--no-batching")
    service = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if service.poll() is not None:
                raise SystemExit(f"service exited: {service.stdout.read()}")
            try:
                if fetch(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("service did not start within 120 s") from None
                time.sleep(0.2)
        encoded = [json.dumps(p).encode() for p in pool]
        warmup = load(port, encoded, expected, WARMUP_REQUESTS, clients, time.monotonic() + 120)
        rss_before = rss_mb(service.pid)
        calls_before = fetch(port, "GET", "/metadata")[1]["model_calls"]
        result = load(port, encoded, expected, requests, clients, time.monotonic() + max_seconds)
        rss_after = rss_mb(service.pid)
        calls = fetch(port, "GET", "/metadata")[1]["model_calls"] - calls_before
        result.update({
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


if __name__ == "__main__":
    main()
