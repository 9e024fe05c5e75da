"""Limits that keep one client's requests from taking the server from everyone else, through the real server."""
from __future__ import annotations

import threading

import grpc

from server_support import *  # noqa: F401,F403
from server_support import device_bytes, wait_until

PROMPT = "Hello there, adapters!"


def _waiting(server) -> int:
    return int(server.metrics.adapters_waiting._value.get())


def test_requests_waiting_for_adapter_memory_leave_health_info_and_admin_answering(start_server, registry):
    """lora0 and lora1 decode and hold the adapter budget; a burst of requests for lora2/lora3 must wait for
    room. Only batch + queue of them are admitted (waiting counts against the queue), the rest are refused at
    once, and Health, GetInfo, ListAdapters, LoadAdapter and UnloadAdapter still answer."""
    server, client = start_server(max_new_tokens=4000)
    budget = device_bytes(server.engine, registry, "lora3")
    server, client = start_server(max_new_tokens=4000, adapter_memory=budget, adapter_wait_seconds=600,
                                  max_batch_size=2, max_queue=2)
    streams = [client.generate_stream(PROMPT, adapters=[name], max_new_tokens=4000) for name in ("lora0", "lora1")]
    for stream in streams:
        next(stream), next(stream)  # adapters chunk, then a token: decoding, holding the budget
    burst = 30  # more than the old thread count (batch + queue + 16) less the two streams
    answers, refusals = [], []

    def ask(name: str) -> None:
        try:
            answers.append(client.generate(PROMPT, adapters=[name], max_new_tokens=2))
        except grpc.RpcError as e:
            refusals.append((e.code(), e.details()))

    threads = [threading.Thread(target=ask, args=(f"lora{2 + i % 2}",)) for i in range(burst)]
    for thread in threads:
        thread.start()
    wait_until(lambda: _waiting(server) + len(refusals) == burst, "every request of the burst waits or is refused")
    assert client.health() == "SERVING"
    assert client.info().limits.max_queue == 2
    assert "lora0@1.0.0" in {a.ref for a in client.list_adapters().adapters}
    assert client.load_adapter("bitfit").adapter.ref == "bitfit@1.0.0"
    assert client.unload_adapter("bitfit").adapter.ref == "bitfit@1.0.0"
    assert _waiting(server) == 2  # the queue's two places; the batch's rows are the streams'
    assert {code for code, _ in refusals} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("at capacity" in details for _, details in refusals), refusals[:1]
    for stream in streams:
        stream.cancel()
    for thread in threads:
        thread.join()
    assert len(answers) == 2 and all(a.finish_reason == "length" for a in answers)
