"""The gRPC server end to end: real server on a localhost port, real PEFT adapters from a real registry."""
from __future__ import annotations

import threading
import urllib.request

import grpc
import pytest
import torch

from server_support import ADAPTER_MIXES, CONTEXT, DEVICE, device_bytes, frozen, served_model, wait_until

from runtime.proto.adapterhub.v1 import runtime_pb2 as pb

PROMPT = "Hello there, adapters!"


def _peft(served_base, folder):
    from peft import PeftModel

    model, tokenizer = served_model(served_base)
    return PeftModel.from_pretrained(model, str(folder)).eval(), tokenizer


def _peft_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy tokens from PEFT's forward, recomputed over the whole sequence each step (no cache: PEFT's
    own `generate` mishandles prompt tuning's cache in this transformers version; its forward is the peer)."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            tail = torch.tensor([out], dtype=ids.dtype, device=ids.device)
            token = int(model(input_ids=torch.cat([ids, tail], 1)).logits[0, -1].argmax())
            if token == 2:  # EOS: the server stops and does not report it
                break
            out.append(token)
    return out


@pytest.mark.parametrize("technique", ["lora0", "ia3", "prompt_tuning"])
def test_greedy_generation_equals_peft(start_server, served_base, served_adapters, technique):
    """What a client gets is what PEFT computes for the same adapter (greedy, fp32)."""
    _, client = start_server()
    reply = client.generate(PROMPT, adapters=[technique.replace("_", "-")], max_new_tokens=12)
    peft_model, tokenizer = _peft(served_base, served_adapters[technique])
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(DEVICE)
    expected = _peft_greedy(peft_model, ids, 12)
    assert list(reply.token_ids) == expected
    assert reply.finish_reason == ("length" if len(expected) == 12 else "stop")
    assert reply.usage.prompt_tokens == ids.shape[1] and reply.usage.completion_tokens == len(expected)


def test_score_equals_peft_logprobs(start_server, served_base, served_adapters):
    _, client = start_server()
    reply = client.score(PROMPT, adapters=["lora1"])
    peft_model, tokenizer = _peft(served_base, served_adapters["lora1"])
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = peft_model(input_ids=ids.to(DEVICE)).logits[0, :-1].cpu()
    expected = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    assert list(reply.token_ids) == ids[0].tolist()
    assert torch.allclose(torch.tensor(list(reply.logprobs)), expected, atol=1e-5, rtol=0)
    assert reply.total_logprob == pytest.approx(float(expected.sum()), abs=1e-3)
    assert [a.ref for a in reply.adapters] == ["lora1@1.0.0"]


REQUESTS = {**ADAPTER_MIXES, "by_ids": dict(adapters=["lora2"], token_ids=list(range(3, 40)))}


def test_concurrent_clients_get_what_each_gets_alone(start_server):
    """Requests with different adapters and techniques, batched together in one step, answer as alone."""
    server, client = start_server()

    def ask(kwargs):
        prompt = None if "token_ids" in kwargs else PROMPT
        return list(client.generate(prompt, max_new_tokens=10, **kwargs).token_ids)

    alone = {name: ask(kwargs) for name, kwargs in REQUESTS.items()}
    assert len({tuple(v) for v in alone.values()}) > len(REQUESTS) // 2  # the adapters really change the output
    together: dict[str, list[int]] = {}
    threads = [threading.Thread(target=lambda n=name, k=kwargs: together.__setitem__(n, ask(k)))
               for name, kwargs in REQUESTS.items()]
    with frozen(server):  # every request queues before any joins: they share their steps
        for t in threads:
            t.start()
        wait_until(lambda: server.scheduler.queue_depths()[1] == len(REQUESTS), "all requests queued")
    for t in threads:
        t.join()
    assert together == alone


def test_stream_chunks_add_up_to_the_whole_answer(start_server):
    _, client = start_server()
    whole = client.generate(PROMPT, adapters=["lora0"], max_new_tokens=20)
    chunks = list(client.generate_stream(PROMPT, adapters=["lora0"], max_new_tokens=20))
    assert [a.ref for a in chunks[0].adapters] == ["lora0@1.0.0"] and chunks[0].adapters[0].sha256
    assert all(not c.adapters for c in chunks[1:])
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    assert "".join(c.text for c in chunks) == whole.text
    assert len([c for c in chunks if c.token_ids]) == len(whole.token_ids)  # one chunk per token, as generated
    assert chunks[-1].finish_reason == whole.finish_reason and not any(c.finish_reason for c in chunks[:-1])
    assert chunks[-1].usage == whole.usage


def test_stop_string_ends_the_text_before_it(start_server):
    _, client = start_server()
    full = client.generate(PROMPT, adapters=["lora0"], max_new_tokens=30)
    stop = full.text[8:10]
    assert len(full.text) > 10 and stop
    cut = full.text.index(stop)
    reply = client.generate(PROMPT, adapters=["lora0"], max_new_tokens=30, stop=[stop])
    assert reply.text == full.text[:cut]
    assert reply.finish_reason == "stop"
    streamed = list(client.generate_stream(PROMPT, adapters=["lora0"], max_new_tokens=30, stop=[stop]))
    assert "".join(c.text for c in streamed) == full.text[:cut] and streamed[-1].finish_reason == "stop"


def test_a_request_with_stop_strings_decodes_each_token_once(start_server):
    """The batch decodes a request with stop strings (it watches for them) and the server streams that text:
    such a request makes no more decode calls than one without stop strings (it once made twice as many)."""
    server, client = start_server()
    tokenizer = server.engine.tokenizer
    calls: list[int] = []
    decode = tokenizer.decode
    tokenizer.decode = lambda *args, **kwargs: calls.append(1) or decode(*args, **kwargs)
    try:
        plain = client.generate(PROMPT, adapters=["lora0"], max_new_tokens=20)
        alone, calls[:] = len(calls), []
        watched = list(client.generate_stream(PROMPT, adapters=["lora0"], max_new_tokens=20, stop=["\x00never"]))
    finally:
        del tokenizer.decode
    assert "".join(c.text for c in watched) == plain.text and alone > 0
    assert len(calls) == alone


def test_chat_flag_applies_the_chat_template(start_server, served_base):
    _, client = start_server()
    _, tokenizer = served_model(served_base)
    templated = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"]
    chat = client.generate("hi", chat=True, max_new_tokens=6)
    by_ids = client.generate(token_ids=templated, max_new_tokens=6)
    assert chat.usage.prompt_tokens == len(templated) == 5
    assert chat.token_ids == by_ids.token_ids


def test_new_version_under_a_tag_is_served_by_the_next_request(start_server, registry, served_base, served_adapters):
    _, client = start_server()
    registry.push(served_adapters["lora0"], "moving", "1.0.0", base_model=str(served_base))
    registry.tag("moving@1.0.0", "prod")
    first = client.generate(PROMPT, adapters=["moving@prod"], max_new_tokens=8)
    registry.push(served_adapters["lora1"], "moving", "2.0.0", base_model=str(served_base))
    registry.tag("moving@2.0.0", "prod")
    second = client.generate(PROMPT, adapters=["moving@prod"], max_new_tokens=8)
    assert [a.ref for a in first.adapters] == ["moving@1.0.0"]
    assert [a.ref for a in second.adapters] == ["moving@2.0.0"]
    assert first.adapters[0].sha256 != second.adapters[0].sha256
    assert first.token_ids == client.generate(PROMPT, adapters=["lora0"], max_new_tokens=8).token_ids
    assert second.token_ids == client.generate(PROMPT, adapters=["lora1"], max_new_tokens=8).token_ids


def test_hot_load_while_another_request_decodes(start_server):
    """An adapter loaded from disk while a long request decodes: both answer as alone, and the long one
    was still running (holding its adapter) when the new one finished."""
    server, client = start_server(max_new_tokens=4000)
    stream = client.generate_stream(PROMPT, adapters=["lora0"], max_new_tokens=4000)
    head = [next(stream) for _ in range(3)]  # adapters chunk + 2 tokens: lora0 is decoding
    assert {a.ref: a.tier for a in client.list_adapters().adapters} == {"lora0@1.0.0": pb.TIER_DEVICE}
    reply = client.generate(PROMPT, adapters=["lora3"], max_new_tokens=8)  # cold: read, checked, loaded
    held = {a.ref: a.in_use for a in client.list_adapters().adapters}
    assert held == {"lora0@1.0.0": 1, "lora3@1.0.0": 0}  # the long request was still in the batch
    stream.cancel()
    tokens = [t for c in head for t in c.token_ids]
    assert reply.token_ids == client.generate(PROMPT, adapters=["lora3"], max_new_tokens=8).token_ids
    assert tokens == list(client.generate(PROMPT, adapters=["lora0"], max_new_tokens=len(tokens)).token_ids)
    assert server.metrics.loads.labels(source="disk")._value.get() == 2


def _hold_lora0_and_lora1(client):
    """Two long streams running with lora0 and lora1 (r=4, r=8): they hold those adapters on the device."""
    streams = [client.generate_stream(PROMPT, adapters=[name], max_new_tokens=4000) for name in ("lora0", "lora1")]
    for stream in streams:
        next(stream), next(stream)  # adapters chunk, then a token: decoding
    return streams


def _waiting(server) -> int:
    return int(server.metrics.adapters_waiting._value.get())


def test_requests_for_more_adapters_than_the_budget_holds_wait_for_room(start_server, registry):
    """The budget holds lora3 (r=16) alone, or lora0 + lora1; both are in use by running requests. Requests
    for lora2 and lora3 wait until those finish, in arrival order, then load and answer as alone: none is
    refused for lack of room."""
    server, client = start_server(max_new_tokens=4000)
    budget = device_bytes(server.engine, registry, "lora3")
    alone = {name: list(client.generate(PROMPT, adapters=[name], max_new_tokens=6).token_ids)
             for name in ("lora2", "lora3")}
    server, client = start_server(max_new_tokens=4000, adapter_memory=budget)
    streams = _hold_lora0_and_lora1(client)
    replies: dict[str, object] = {}
    threads = [threading.Thread(target=lambda n=name: replies.__setitem__(
        n, client.generate(PROMPT, adapters=[n], max_new_tokens=6))) for name in ("lora2", "lora3")]
    for thread in threads:
        thread.start()
    wait_until(lambda: _waiting(server) == 2, "both requests wait for device room")
    assert {a.ref: a.tier for a in client.list_adapters().adapters}["lora3@1.0.0"] == pb.TIER_HOST  # read, waiting
    for stream in streams:
        stream.cancel()
    for thread in threads:
        thread.join()
    assert {name: list(reply.token_ids) for name, reply in replies.items()} == alone
    assert server.metrics.adapter_waits._value.get() == 2 and _waiting(server) == 0
    assert server.metrics.requests.labels(frontend="grpc", method="Generate", code="RESOURCE_EXHAUSTED")._value.get() == 0


def test_a_deadline_ends_the_wait_for_room(start_server, registry):
    """The server may let a request wait 600 s for room; its client's 0.5 s deadline ends that wait on the
    server (not only in the client): it leaves the queue while lora0 and lora1 are still held, and lora3 is
    not loaded or used once their room frees."""
    server, client = start_server(max_new_tokens=4000)
    budget = device_bytes(server.engine, registry, "lora3")
    server, client = start_server(max_new_tokens=4000, adapter_memory=budget, adapter_wait_seconds=600)
    streams = _hold_lora0_and_lora1(client)
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(PROMPT, adapters=["lora3"], max_new_tokens=2, timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: _waiting(server) == 0, "the expired request stopped waiting")
    held = {a.ref: a.in_use for a in client.list_adapters().adapters}
    assert held["lora0@1.0.0"] == 1 and held["lora1@1.0.0"] == 1  # the wait ended before any room freed
    for stream in streams:
        stream.cancel()
    wait_until(lambda: all(a.in_use == 0 for a in client.list_adapters().adapters), "the streams let go")
    lora3 = {a.ref: a for a in client.list_adapters().adapters}["lora3@1.0.0"]
    assert lora3.tier != pb.TIER_DEVICE and lora3.requests_served == 0 and lora3.last_used_unix == 0
    assert client.generate(PROMPT, adapters=["lora3"], max_new_tokens=2).finish_reason == "length"


def test_an_adapter_only_on_the_remote_is_pulled_checked_and_served(start_server, registry, served_base,
                                                                   served_adapters, tmp_path):
    """`hub serve --remote`: a ref the local registry lacks is pulled (every file's sha256 checked) by the
    request that names it, even by several at once, and served; one on neither is NOT_FOUND naming both."""
    from hub.registry import Registry

    shared = Registry(tmp_path / "shared")
    shared.push(served_adapters["lora1"], "team/shared", "1.0.0", base_model=str(served_base))
    server, client = start_server(remote=str(shared.root))
    expected = list(client.generate(PROMPT, adapters=["lora1"], max_new_tokens=8).token_ids)
    replies: list = []
    threads = [threading.Thread(target=lambda: replies.append(
        client.generate(PROMPT, adapters=["team/shared"], max_new_tokens=8))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [list(r.token_ids) for r in replies] == [expected] * 3
    assert {a.ref for r in replies for a in r.adapters} == {"team/shared@1.0.0"}
    assert registry.resolve("team/shared").files == shared.resolve("team/shared").files  # now a local version
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(PROMPT, adapters=["team/nowhere"])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "remote" in caught.value.details()


def test_a_version_pushed_or_a_tag_moved_on_the_remote_is_served_by_the_next_request(start_server, registry,
                                                                                    served_base, served_adapters,
                                                                                    tmp_path):
    """`hub serve --remote`: a name or a tag names what it names on the remote now, though an earlier version is
    already pulled; an exact version the registry holds is not looked up again."""
    from hub.registry import Registry

    shared = Registry(tmp_path / "shared")
    shared.push(served_adapters["lora1"], "team/moving", "1.0.0", base_model=str(served_base))
    shared.tag("team/moving@1.0.0", "prod")
    _, client = start_server(remote=str(shared.root))

    def served(ref: str) -> str:
        return client.generate(PROMPT, adapters=[ref], max_new_tokens=2).adapters[0].ref

    assert served("team/moving") == served("team/moving@prod") == "team/moving@1.0.0"
    shared.push(served_adapters["lora2"], "team/moving", "2.0.0", base_model=str(served_base))
    assert (served("team/moving"), served("team/moving@prod")) == ("team/moving@2.0.0", "team/moving@1.0.0")
    shared.tag("team/moving@2.0.0", "prod")
    assert served("team/moving@prod") == "team/moving@2.0.0"
    assert client.generate(PROMPT, adapters=["team/moving@prod"], max_new_tokens=8).token_ids == \
        client.generate(PROMPT, adapters=["lora2"], max_new_tokens=8).token_ids


def test_a_damaged_file_on_the_remote_is_data_loss_and_nothing_is_kept(start_server, registry, served_base, tmp_path):
    from helpers import save_peft_adapter, tiny_llama
    from peft import LoraConfig

    from hub.errors import NotFound
    from hub.registry import Registry

    fresh = save_peft_adapter(tiny_llama(max_position_embeddings=CONTEXT),  # bytes the local store lacks
                              LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), tmp_path / "fresh", seed=99)
    shared = Registry(tmp_path / "shared")
    manifest = shared.push(fresh, "team/broken", "1.0.0", base_model=str(served_base))
    blob = shared.store.path(manifest.files["adapter_model.safetensors"]["sha256"])
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    _, client = start_server(remote=str(shared.root))
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(PROMPT, adapters=["team/broken"])
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS, caught.value.details()
    assert "team/broken" in caught.value.details()
    with pytest.raises(NotFound):
        registry.resolve("team/broken")
    assert client.generate(PROMPT, adapters=["lora0"], max_new_tokens=2).finish_reason == "length"


def test_list_adapters_and_info(start_server):
    server, client = start_server(adapter_memory=1 << 20, max_batch_size=4)
    client.generate(PROMPT, adapters=["lora0"], max_new_tokens=2)
    client.generate(PROMPT, adapters=["lora0", "ia3"], max_new_tokens=2)
    listed = {a.ref: a for a in client.list_adapters().adapters}
    assert listed["lora0@1.0.0"].requests_served == 2 and listed["ia3@1.0.0"].requests_served == 1
    assert listed["lora0@1.0.0"].tier == pb.TIER_DEVICE and listed["lora0@1.0.0"].size_bytes > 0
    assert listed["lora0@1.0.0"].last_used_unix > 0 and listed["lora0@1.0.0"].in_use == 0
    info = client.info()
    from hub.checkpoint import fingerprint

    assert info.architecture_fingerprint == fingerprint(server.engine.model.config, {})
    assert info.limits.max_batch_size == 4 and info.limits.adapter_memory_bytes == 1 << 20
    assert info.limits.context_length == 4096 and info.dtype == "float32" and info.device.startswith(DEVICE)
    assert set(info.techniques) == {"lora", "ia3", "prompt_tuning", "bitfit", "bottleneck"}


def test_health_and_reflection_answer(start_server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    server, client = start_server()
    assert client.health() == "SERVING"
    assert client.health("adapterhub.v1.Runtime") == "SERVING"
    database = ProtoReflectionDescriptorDatabase(client.channel)
    services = set(database.get_services())
    assert {"adapterhub.v1.Runtime", "grpc.health.v1.Health"} <= services
    described = database.FindFileContainingSymbol("adapterhub.v1.Runtime")
    assert described.name == "adapterhub/v1/runtime.proto"
    assert "Generate" in [m.name for m in described.service[0].method]


def test_metrics_endpoint_with_bounded_adapter_labels(start_server):
    server, client = start_server(metrics_port=0, max_adapter_labels=2)
    for name in ("lora0", "lora1", "lora2", "lora3"):
        client.generate(PROMPT, adapters=[name], max_new_tokens=3)
    with pytest.raises(grpc.RpcError):
        client.generate("", max_new_tokens=3)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    assert 'adapterhub_requests_total{code="OK",frontend="grpc",method="Generate"} 4.0' in text
    assert 'adapterhub_requests_total{code="INVALID_ARGUMENT",frontend="grpc",method="Generate"} 1.0' in text
    assert 'adapterhub_adapter_requests_total{adapter="lora0"} 1.0' in text
    assert 'adapterhub_adapter_requests_total{adapter="other"} 2.0' in text
    assert 'adapterhub_adapter_requests_total{adapter="lora2"}' not in text
    assert 'adapterhub_adapter_loads_total{source="disk"} 4.0' in text
    for name in ("adapterhub_time_to_first_token_seconds_count 4.0", "adapterhub_tokens_per_second",
                 "adapterhub_queue_depth", "adapterhub_batch_size", "adapterhub_adapter_cache_misses_total 4.0",
                 'adapterhub_adapter_resident_bytes{tier="device"}', "adapterhub_adapter_load_seconds_bucket",
                 'adapterhub_generated_tokens_total{adapter="lora0"} 3.0'):
        assert name in text, name


def test_freeze_startup_heap_takes_what_is_alive_out_of_the_cyclic_gc():
    """`hub serve` calls it once started, so full collections stop walking the model, torch and gRPC."""
    import gc

    from runtime.server import freeze_startup_heap

    alive = [object()]  # a container the GC tracks
    before = gc.get_freeze_count()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > before
        assert not any(o is alive for o in gc.get_objects())  # no collection walks it any more
        made_after = [object()]
        assert any(o is made_after for o in gc.get_objects())  # what comes later is collected as usual
    finally:
        gc.unfreeze()
