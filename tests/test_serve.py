"""recbole-llm serve: the real service in its own process, over a real exported artifact, over HTTP.

Needs no torch or RecBole once the artifacts exist (CI runs it in a serving install)."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import pytest

from recbole_llm.serving.runtime import Recommender

from helpers import BAD_REQUESTS, LIMITS, Service, direct, same

pytest.importorskip("fastapi")  # the [serve] extra; [test] installs it


@pytest.fixture(scope="module")
def service(artifact):
    running = Service(artifact, *LIMITS)
    yield running
    running.close()


def test_answers_match_the_runtime_and_metadata_says_what_is_served(service, artifact):
    tokens = Recommender(artifact).tokens
    histories = [tokens[1:6], tokens[10:11], [tokens[3], "no-such-item", tokens[7]]]
    status, body = service.recommend({"histories": histories, "k": 5})
    assert status == 200, body
    assert same(body["recommendations"], direct(artifact, histories, k=5))
    assert body["recommendations"][2]["unknown_tokens"] == 1
    status, kept = service.recommend({"histories": histories[:1], "k": 7, "exclude_seen": False})
    assert status == 200 and same(kept["recommendations"], direct(artifact, histories[:1], k=7, exclude_seen=False))
    # integer tokens are the same items as their strings
    status, as_ints = service.recommend({"histories": [[int(t) for t in tokens[1:6]]], "k": 5})
    assert same(as_ints["recommendations"], body["recommendations"][:1])

    status, metadata = service.get("/metadata")
    assert status == 200 and metadata["model"] == "BERTLoRA" and "item_tokens" not in metadata
    assert metadata["service"]["max_batch"] == 8 and metadata["n_item_tokens"] == len(tokens) - 1


def test_bad_requests_get_4xx_and_the_service_keeps_answering(service, artifact):
    good = {"histories": [["1", "2", "3"], ["50"]], "k": 10}
    before = service.recommend(good)
    assert before[0] == 200
    for payload, status, message in BAD_REQUESTS:
        got_status, body = service.recommend(payload)
        assert (got_status, message in body.get("error", "")) == (status, True), (payload, got_status, body)
        assert "\n" not in body["error"]
    assert service.request("GET", "/recommend")[0] == 405
    status, body = service.get("/no-such-route")
    assert status == 404 and "POST /recommend" in body["error"]
    # still up, and the same request gets the same answer as before the bad ones
    assert service.get("/health") == (200, {"status": "ok"})
    assert service.recommend(good) == before
    assert service.process.poll() is None


def test_explanations_over_http_are_the_runtimes(service, artifact):
    recommender = Recommender(artifact)
    history = recommender.tokens[1:6]
    status, body = service.recommend({"histories": [history], "k": 3, "explain": True})
    assert status == 200, body
    (answer,) = body["recommendations"]
    (direct_answer,) = recommender.recommend([history], k=3, explain=True)
    assert answer["items"] == direct_answer.items and len(answer["explanations"]) == 3
    for got, want in zip(answer["explanations"], direct_answer.explanations):
        assert [c["item"] for c in got] == [c.item for c in want] and sorted(c["item"] for c in got) == sorted(history)
        assert all(abs(g["effect"] - w.effect) <= 1e-4 for g, w in zip(got, want))
    status, body = service.recommend({"histories": [history], "k": 3})
    assert status == 200 and "explanations" not in body["recommendations"][0]  # only when asked for


@pytest.mark.slow
def test_the_explain_limit_counts_what_a_request_costs_and_names_how_to_raise_it(artifact):
    """--max-explained bounds the model rows an explained request costs (each history, and it once without
    each item the model reads): a request at the limit is answered (as the runtime answers it), one history
    more is 413 before the model runs; the old count (histories x k) let such requests through."""
    recommender = Recommender(artifact)
    window = recommender.tokens[1 : 1 + recommender.max_length]  # a full window: max_length + 1 rows
    rows = recommender.max_length + 1
    limited = Service(artifact, "--max-explained", str(2 * rows))
    try:
        status, body = limited.recommend({"histories": [window, window[::-1]], "k": 2, "explain": True})
        assert status == 200, body
        for got, want in zip(body["recommendations"], recommender.recommend([window, window[::-1]], k=2, explain=True)):
            assert got["items"] == want.items
            assert [[c["item"] for c in e] for e in got["explanations"]] == [[c.item for c in e] for e in want.explanations]
        calls = limited.get("/metadata")[1]["model_calls"]
        status, body = limited.recommend({"histories": [window] * 3, "k": 1, "explain": True})
        assert status == 413 and body["error"] == (
            f"explaining this request costs {3 * rows} model rows (each history, and it once without each item the "
            f"model reads); the limit is {2 * rows}: send fewer or shorter histories, or start the service with a "
            "larger --max-explained")
        status, body = limited.recommend({"histories": [window[:3]] * 3, "k": 2, "explain": True})  # shorter: fits
        assert status == 200, body
        metadata = limited.get("/metadata")[1]
        assert metadata["model_calls"] == calls + 1 and metadata["service"]["max_explained"] == 2 * rows
        assert metadata["service"]["exclude_seen_default"] is True and metadata["repeat_rate"] == 0.0
    finally:
        limited.close()


def test_unknown_tokens_under_the_strict_policy_are_refused(artifact):
    strict = Service(artifact, "--unknown-tokens", "error")
    try:
        status, body = strict.recommend({"histories": [["1", "no-such-item"]]})
        assert status == 422 and "unknown item tokens (first: 'no-such-item')" in body["error"]
        status, body = strict.recommend({"histories": [["1", "2"]]})
        assert status == 200 and same(body["recommendations"], direct(artifact, [["1", "2"]], unknown_tokens="error"))
    finally:
        strict.close()


@pytest.mark.slow
def test_concurrent_requests_get_their_own_answers(service, artifact):
    tokens = Recommender(artifact).tokens
    requests = [{"histories": [tokens[1 + i : 2 + i + i % 7]], "k": 1 + i % 10, "exclude_seen": i % 2 == 0}
                for i in range(48)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(service.recommend, requests))
    for request, (status, body) in zip(requests, answers):
        assert status == 200
        assert same(body["recommendations"], direct(artifact, request["histories"], request["k"],
                                                    request["exclude_seen"]))


@pytest.mark.slow
def test_items_added_over_http_are_recommended_at_once(serving_artifacts, service):
    """POST /items (on with --allow-item-updates): new items from their text, answered as the runtime answers
    after add_items; recommendations meanwhile and after see them; bad items get 4xx and add nothing."""
    catalogue = serving_artifacts["catalogue"]
    status, body = service.request("POST", "/items", json.dumps({"items": {"new-1": "a film"}}).encode())
    assert status == 403 and "--allow-item-updates" in body["error"]  # off unless asked for
    updating = Service(catalogue, "--allow-item-updates", "--max-new-items", "3")
    try:
        new = {"new-1": "Star Wars: Episode IX (2019), Action Adventure Sci-Fi",
               "new-2": {"movie_title": "Toy Story 3 (2010)", "class": "Animation Children Comedy"}}
        status, body = updating.request("POST", "/items", json.dumps({"items": new}).encode())
        assert status == 200 and body["added"] == ["new-1", "new-2"], body
        local = Recommender(catalogue)
        local.add_items(new)
        histories = [["50", "181", "new-1"], ["new-2"]]
        status, body = updating.recommend({"histories": histories, "k": 20})
        want = [asdict(a) for a in local.recommend(histories, k=20)]
        assert status == 200 and same(body["recommendations"], want)
        status, body = updating.recommend({"histories": [["50", "181"]], "k": local.max_k, "exclude_seen": False})
        assert {"new-1", "new-2"} <= set(body["recommendations"][0]["items"])
        assert updating.get("/metadata")[1]["n_item_tokens"] == len(local.tokens) - 1
        for payload, code in [({"items": {"new-1": "again"}}, 409), ({"items": {"new-3": ""}}, 422),
                              ({"items": {f"n{i}": "x" for i in range(4)}}, 413), ({"items": []}, 422),
                              ({"things": {}}, 422), ({"items": {"new-1": "x"}, "extra": 1}, 422)]:
            status, body = updating.request("POST", "/items", json.dumps(payload).encode())
            assert status == code and "\n" not in body["error"], (payload, status, body)
        status, body = updating.request("POST", "/items", b'{"items": {"new-4": "a", "new-4": "b"}}')
        assert status == 422 and "appears twice" in body["error"]
        assert updating.get("/metadata")[1]["n_item_tokens"] == len(local.tokens) - 1  # nothing added
    finally:
        updating.close()


def test_serve_refuses_a_folder_that_is_not_an_artifact(tmp_path):
    result = subprocess.run([sys.executable, "-m", "recbole_llm", "serve", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("recbole-llm: error:") and "not an exported artifact" in result.stderr


SERVING_PROCESS = """
import json, sys
from recbole_llm.serving.runtime import Recommender
from recbole_llm.serving.http import create_app
from recbole_llm.cli import main
recommender = Recommender(sys.argv[1])
[answer] = recommender.recommend([recommender.tokens[1:6]], k=5)
create_app(sys.argv[1])
main(["--help"])
print(json.dumps({"items": answer.items, "heavy": sorted(m for m in ("torch", "recbole", "transformers", "peft")
                                                        if m in sys.modules)}))
"""


def test_serving_imports_neither_torch_nor_recbole(artifact):
    """The runtime, the service and the CLI's help answer without importing torch or RecBole."""
    run = subprocess.run([sys.executable, "-c", SERVING_PROCESS, artifact], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    recommender = Recommender(artifact)
    assert result["items"] == direct(artifact, [recommender.tokens[1:6]], k=5)[0]["items"]


def test_an_explained_request_runs_in_a_model_call_of_its_own(artifact):
    """Requests waiting together share a call, except an explained one: it runs alone, so the wait it causes
    others is its own bounded cost, never several explained requests' at once."""
    import asyncio

    from recbole_llm.serving.batching import Batcher, Job

    recommender = Recommender(artifact)

    def job(explain: bool) -> Job:
        encoded = recommender.encode([["1", "2", "3"]])
        return Job(encoded, [3], [True], [explain])

    async def scenario():
        batcher = Batcher(recommender, max_rows=8, batching=True)
        await batcher.start()
        try:
            jobs = [job(False), job(False), job(True), job(True), job(False)]
            answers = await asyncio.gather(*(batcher.submit(j) for j in jobs))
            return batcher.calls, answers
        finally:
            await batcher.stop()

    calls, answers = asyncio.run(scenario())
    assert calls == 4, calls  # [plain, plain], [explained], [explained], [plain]
    assert [a[0].explanations is not None for a in answers] == [False, False, True, True, False]
    assert all(a[0].items == answers[0][0].items for a in answers)
