"""benchmarks/soak.py without Ray: each kind of request it sends is well formed, an answer is
counted as a 200 only when it holds its image (a URL that answers, a stream that completes),
and its report adds up. tests/integration/test_benchmarks_soak.py runs it end to end."""

import asyncio
import json

import httpx
import pytest

from tests.conftest import benchmark_module


@pytest.fixture(scope="module")
def soak():
    return benchmark_module("soak")


def completed_stream(*events) -> bytes:
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()


PREVIEW = {"type": "image_generation.partial_image", "b64_json": "eA==", "partial_image_index": 0}
DONE = {"type": "image_generation.completed", "b64_json": "eA=="}


def serve_with(answer):
    """An httpx client whose server checks each request's shape and answers ``answer(request)``."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        if request.method == "GET":
            return answer(request)
        body = request.content.decode(errors="replace")
        if request.url.path.endswith("/generations"):
            payload = json.loads(body)
            assert payload["prompt"] and isinstance(payload["seed"], int)
        else:
            assert 'name="image"; filename="in.png"' in body and 'name="seed"' in body
        return answer(request)

    return httpx.AsyncClient(transport=httpx.MockTransport(handler)), seen


def test_every_kind_is_sent_and_a_200_needs_its_image(soak):
    def answer(request):
        if request.method == "GET":
            return httpx.Response(200, content=b"\x89PNG")
        payload = json.loads(request.content) if request.url.path.endswith("/generations") else {}
        if payload.get("stream"):
            return httpx.Response(200, content=completed_stream(PREVIEW, DONE),
                                  headers={"content-type": "text/event-stream"})
        url_format = b"response_format" in request.content and b"url" in request.content
        item = {"url": "http://x/v1/images/files/abc"} if url_format else {"b64_json": "eA=="}
        return httpx.Response(200, json={"data": [item]})

    async def every_kind():
        client, seen = serve_with(answer)
        async with client:
            results = {kind: await soak.send(client, "http://x", kind, 3) for kind in soak.KINDS}
        return results, seen

    results, seen = asyncio.run(every_kind())
    assert results == {kind: ("200", "") for kind in soak.KINDS}
    routes = {request.url.path for request in seen}
    assert routes == {"/v1/images/generations", "/v1/images/edits", "/v1/images/variations",
                      "/v1/images/upscale", "/v1/images/files/abc"}
    masked = [r for r in seen if r.url.path.endswith("/edits") and b'name="mask"' in r.content]
    assert len(masked) == 1  # "edit with mask" only


@pytest.mark.parametrize("kind,response,expected", [
    ("generate b64", httpx.Response(503, json={"error": {"code": "overloaded", "message": "A model replica failed"}}),
     ("503", "overloaded: A model replica failed")),
    ("generate url", "url gone", ("url 404", None)),
    ("stream sd 2.1", completed_stream(PREVIEW, {"type": "error", "error": {"code": "overloaded", "message": "lost"}}),
     ("stream error", "overloaded: lost")),
    ("stream sd 2.1", completed_stream(PREVIEW), ("stream broken", "events: ['image_generation.partial_image']")),
])
def test_what_is_not_a_200(soak, kind, response, expected):
    def answer(request):
        if request.method == "GET":
            return httpx.Response(404, text="no such image")
        if response == "url gone":
            return httpx.Response(200, json={"data": [{"url": "http://x/v1/images/files/abc"}]})
        if isinstance(response, bytes):
            return httpx.Response(200, content=response)
        return response

    async def once():
        client, _ = serve_with(answer)
        async with client:
            return await soak.send(client, "http://x", kind, 1)

    status, cause = asyncio.run(once())
    assert status == expected[0] and (expected[1] is None or cause == expected[1])


def test_the_report_counts_statuses_kills_and_every_cause(soak, tmp_path):
    result = soak.Soak(duration_s=100, concurrency=2, kill_every_s=45)
    result.kills = [soak.Kill(45.0, "SERVE_REPLICA::images#stable-diffusion-2-1#abc", "stable-diffusion-2-1", "RUNNING 1"),
                    soak.Kill(90.0, "SERVE_REPLICA::images#SafetyChecker#def", "SafetyChecker", "STARTING 1")]
    result.runs_again = 3
    result.outcomes = [soak.Outcome("generate b64", t, 1.0, "200") for t in range(0, 97, 2)]
    result.outcomes += [soak.Outcome("stream sd 2.1", 44.5, 20.0, "stream error", "overloaded: a | b"),
                        soak.Outcome("edit", 89.0, 3.0, "503", "overloaded: lost twice")]
    report = soak.write_report(result, tmp_path, "python3 -m benchmarks.soak", "a CPU", smoke=False).read_text()
    assert report == (tmp_path / "soak.md").read_text()
    # 51 requests, 2 not 200; in flight at a kill: the generations sent at 44 s and 90 s, and
    # both failures.
    assert "| 51 | 49 | 2 | 3.92% | 2 | 4 (2) | 3 |" in report
    assert "| 200 | 49 |" in report and "| 503 | 1 |" in report and "| stream error | 1 |" in report
    assert "| 45 s | stable-diffusion-2-1 | `abc` | RUNNING 1 |" in report
    assert "| 90 s | SafetyChecker | `def` | STARTING 1 |" in report
    assert "| 44 s | stream sd 2.1 | 20.0 s | stream error | overloaded: a / b |" in report
    assert "| 89 s | edit | 3.0 s | 503 | overloaded: lost twice |" in report
    assert "Command: `python3 -m benchmarks.soak`" in report and "smoke" not in report
