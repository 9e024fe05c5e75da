"""runtime/cluster_http.py without Ray: the adapter set an HTTP body routes by (the same as gRPC's for the same
set), the seed a sampling request is given, and the in-process ASGI call each replica answers HTTP with."""
from __future__ import annotations

import asyncio

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from runtime.client import RuntimeClient
from runtime.cluster_http import HttpPart, asgi_call, http_routing_key, seeded_body
from runtime.http import BASE_NAMES

BASES = {"org/base", *BASE_NAMES}


def grpc_key(**kwargs) -> str:
    pytest.importorskip("ray.serve", reason="runtime.cluster needs the cluster extra")
    from runtime.cluster import routing_key

    return routing_key("Generate", RuntimeClient.generate_request("x", **kwargs).SerializeToString())


@pytest.mark.parametrize("path, body, same_as", [
    ("/v1/completions", {"model": "a"}, dict(adapters=["a"])),
    ("/v1/chat/completions", {"model": "org/base", "adapters": [{"ref": "b", "weight": 0.5}, {"ref": "a"}]},
     dict(adapters=[("a", 1.0), ("b", 0.5)])),
    ("/v1/completions", {"model": "base", "adapters": [{"ref": "a"}], "mode": "average"},
     dict(adapters=["a"], mode="average")),
    ("/generate", {"parameters": {"adapter_id": "a"}}, dict(adapters=["a"])),
    ("/", {"parameters": {}}, dict()),
    ("/v1/completions", {"model": ""}, dict()),
])
def test_an_http_body_routes_as_the_same_set_over_grpc(path, body, same_as):
    assert http_routing_key(path, body, BASES) == grpc_key(**same_as)


def test_merges_and_malformed_bodies():
    merged = {"parameters": {"merged_adapters": {"ids": ["b", "a"], "weights": [1, 2], "merge_strategy": "ties"}}}
    key = http_routing_key("/generate", merged, BASES)
    assert key.startswith("merge|a:2,b:1|") and "ties" in key
    assert http_routing_key("/v1/completions", {"adapters": [{"ref": "a", "weight": "heavy"}]}, BASES) == ""
    assert http_routing_key("/v1/completions", {"adapters": "a"}, BASES) == ""


def test_only_sampling_requests_without_a_seed_get_one():
    assert seeded_body("/v1/completions", {"prompt": "x"})["seed"] >= 0  # OpenAI's default temperature is 1
    assert seeded_body("/v1/completions", {"temperature": 0}) is None
    assert seeded_body("/v1/completions", {"seed": 3}) is None
    assert seeded_body("/generate", {"parameters": {"max_new_tokens": 2}}) is None  # LoRAX: greedy by default
    assert seeded_body("/generate", {"parameters": {"do_sample": True}})["parameters"]["seed"] >= 0
    assert seeded_body("/v1/models", {}) is None


def test_an_asgi_call_gives_the_apps_answer_as_it_comes():
    async def whole(request):
        return JSONResponse({"got": (await request.body()).decode(), "q": request.url.query}, status_code=201)

    async def stream(request):
        async def events():
            for i in range(3):
                yield f"data: {i}\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/whole", whole, methods=["POST"]), Route("/stream", stream)])

    async def call(path: str, query: str = "") -> list[HttpPart]:
        return [p async for p in asgi_call(app, "POST" if path == "/whole" else "GET", path, query,
                                           [("content-type", "application/json")], b"hello")]

    first, *rest = asyncio.run(call("/whole", "a=1"))
    assert first.status == 201 and ("content-type", "application/json") in first.headers
    assert b"".join(p.body for p in rest) == b'{"got":"hello","q":"a=1"}'
    first, *rest = asyncio.run(call("/stream"))
    assert first.status == 200 and [p.body for p in rest] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    assert asyncio.run(call("/nowhere"))[0].status == 404
