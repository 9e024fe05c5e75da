"""What one client or one broken artifact must not take from the others: RPC capacity, adapter memory accounting,
parsing and tokenizing time. Through the real server on a localhost port, with real PEFT adapters."""
from __future__ import annotations

import json
import shutil
import threading
import urllib.request

import grpc
import pytest

from server_support import device_bytes, wait_until

from runtime.proto.adapterhub.v1 import runtime_pb2 as pb

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


def _store_unchecked(registry, folder, name: str, like: str, parsed_from):
    """Add `folder` as `name@1.0.0` with `like`'s base info and the manifest of the intact adapter in
    `parsed_from`, bypassing every check of push and of `add_files` (which refuse what these tests need: an
    artifact the runtime fails on, as a registry written before those checks may hold)."""
    from hub.artifact import read_adapter
    from hub.manifest import Provenance, artifact_files, build, sha256_file

    files = {p.name: dict(zip(("size", "sha256"), sha256_file(p))) for p in artifact_files(folder)}
    manifest = build(name, "1.0.0", read_adapter(parsed_from), files, registry.resolve(like).base_model,
                     Provenance("", (), None, {"parents": []}))
    return registry._commit(manifest, {n: folder / n for n in manifest.files}, None)


def _rank_disagrees(registry, served_adapters, tmp_path) -> str:
    """lora0 (r=4) with a config that says r=8, stored bypassing the checks: refused when the runtime reads it."""
    folder = tmp_path / "rank-disagrees"
    shutil.copytree(served_adapters["lora0"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    _store_unchecked(registry, folder, "rank-disagrees", "lora0", served_adapters["lora0"])
    return "rank-disagrees"


def _flip_low_byte(path) -> None:
    """Change the lowest byte of the file's last float32: other bytes, still a finite number."""
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def _damaged(registry, served_adapters, tmp_path) -> str:
    """A LoRA of lora0's size whose stored weights were changed after push: parses, prepares, fails its sha256."""
    folder = tmp_path / "damaged"
    shutil.copytree(served_adapters["lora0"], folder)
    _flip_low_byte(folder / "adapter_model.safetensors")  # its own blob, not lora0's
    manifest = registry.push(folder, "damaged", "1.0.0", base_model=registry.resolve("lora0").base_model.id)
    _flip_low_byte(registry.store.path(manifest.files["adapter_model.safetensors"]["sha256"]))
    return "damaged"


@pytest.mark.parametrize("broken,code", [(_rank_disagrees, grpc.StatusCode.FAILED_PRECONDITION),
                                         (_damaged, grpc.StatusCode.DATA_LOSS)])
def test_a_load_that_fails_after_making_room_gives_the_room_back(start_server, registry, served_adapters, tmp_path,
                                                                 broken, code):
    """The budget holds lora0 and lora1; a broken adapter of lora0's size makes room by moving lora0 off, then
    fails. lora0 stays on the device and counted (the pool's device bytes are the engine's) and serves
    from there, with no new load."""
    server, client = start_server()
    budget = device_bytes(server.engine, registry, "lora0") + device_bytes(server.engine, registry, "lora1")
    name = broken(registry, served_adapters, tmp_path)
    server, client = start_server(adapter_memory=budget)
    before = {n: list(client.generate(PROMPT, adapters=[n], max_new_tokens=4).token_ids) for n in ("lora0", "lora1")}
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(PROMPT, adapters=[name], max_new_tokens=4)
    assert caught.value.code() == code, caught.value.details()
    listed = {a.ref: a for a in client.list_adapters().adapters if a.tier == pb.TIER_DEVICE}
    assert {ref: a.size_bytes for ref, a in listed.items()} == server.engine.resident()
    assert client.list_adapters().device_used_bytes == sum(server.engine.resident().values()) == budget
    loads = server.metrics.loads.labels(source="disk")._value.get()
    assert {n: list(client.generate(PROMPT, adapters=[n], max_new_tokens=4).token_ids) for n in before} == before
    assert server.metrics.loads.labels(source="disk")._value.get() == loads  # served from the device


def _count_tokenizer_calls(server) -> list[str]:
    """Every text the server's real tokenizer is asked to tokenize (or to wrap in the chat template), from now."""
    tokenizer = server.engine.tokenizer
    asked: list[str] = []
    real = type(tokenizer)

    class Counting(real):
        def __call__(self, text, *args, **kwargs):
            asked.append(text)
            return super().__call__(text, *args, **kwargs)

        def apply_chat_template(self, conversation, *args, **kwargs):
            asked.append(conversation[-1]["content"])
            return super().apply_chat_template(conversation, *args, **kwargs)

    tokenizer.__class__ = Counting
    return asked


def test_a_prompt_no_context_could_hold_is_refused_before_it_is_tokenized(start_server):
    """3 MB of text (under the 4 MiB message cap) cannot fit a 4096-token context in any tokens: Generate, its
    chat form and Score refuse it at once with INVALID_ARGUMENT, and the tokenizer never sees it."""
    server, client = start_server()
    asked = _count_tokenizer_calls(server)
    assert client.generate(PROMPT, max_new_tokens=2).finish_reason == "length"
    assert asked == [PROMPT]  # the counter sees what the server tokenizes
    huge = "a" * (3 << 20)
    for call in (lambda: client.generate(huge, max_new_tokens=2), lambda: client.generate(huge, chat=True),
                 lambda: client.score(huge)):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert asked == [PROMPT]  # refused without tokenizing
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "more than the context length 4096 can hold" in caught.value.details()


def test_an_adapter_refused_for_its_content_is_not_read_again_until_its_bytes_change(start_server, registry,
                                                                                      served_adapters, tmp_path):
    """An artifact the runtime refuses (here: its config's rank disagrees with its tensors; and a LoRA made for
    another base) is read and parsed once: the next requests naming it get the same refusal without a read.
    A new artifact under the same version (other sha256) is read again, and served."""
    name = _rank_disagrees(registry, served_adapters, tmp_path)
    _, client = start_server()
    reads: list[str] = []
    read_deferred = registry.read_deferred

    def counting(manifest):
        reads.append(manifest.ref)
        return read_deferred(manifest)

    registry.read_deferred = counting
    for ref in (name, "foreign"):
        refusals = []
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as caught:
                client.generate(PROMPT, adapters=[ref], max_new_tokens=2)
            refusals.append((caught.value.code(), caught.value.details()))
        assert refusals == [refusals[0]] * 3 and refusals[0][0] == grpc.StatusCode.FAILED_PRECONDITION
    assert reads == [f"{name}@1.0.0", "foreign@1.0.0"]
    registry.remove(f"{name}@1.0.0")
    registry.push(served_adapters["lora1"], name, "1.0.0")
    assert client.generate(PROMPT, adapters=[name], max_new_tokens=2).finish_reason == "length"
    assert reads == [f"{name}@1.0.0", "foreign@1.0.0", f"{name}@1.0.0"]


def _merge(client, weight: float):
    return client.generate(PROMPT, adapters=[("lora0", weight), "lora1"], mode="merge",
                           merge=pb.MergeOptions(method="cat"), max_new_tokens=4)


def test_per_request_merges_are_bounded_in_count_on_each_tier(start_server):
    """Every new set of merge weights builds another merge: with max_merged_adapters=2 and room for many more
    in bytes, five merges leave the two most recent on the device, the two before on the host, the first
    dropped; an evicted merge answers as before (brought back, or built again)."""
    server, client = start_server(max_merged_adapters=2)
    first = [list(_merge(client, 0.5 + i).token_ids) for i in range(5)]
    merges = [a for a in client.list_adapters().adapters if a.ref.startswith("merge:")]
    tiers = sorted((a.last_used_unix, a.tier) for a in merges)
    assert [tier for _, tier in tiers] == [pb.TIER_DISK, pb.TIER_HOST, pb.TIER_HOST, pb.TIER_DEVICE, pb.TIER_DEVICE]
    assert sum(1 for key in server.engine.resident() if key.startswith("merge:")) == 2
    assert [list(_merge(client, 0.5 + i).token_ids) for i in range(5)] == first


def test_list_adapters_pages_in_ref_order(start_server, monkeypatch):
    """page_size/page_token walk every adapter once, in ref order; a client that sends no page_size (as old
    clients do) gets the first page of the default size, with the token for the next."""
    import runtime.service

    server, client = start_server()
    for name in ("lora0", "lora1", "lora2", "lora3", "ia3", "bitfit", "bottleneck"):
        client.load_adapter(name)
    refs, token, sizes = [], "", []
    while True:
        page = client.list_adapters(page_size=3, page_token=token)
        refs += [a.ref for a in page.adapters]
        sizes.append(len(page.adapters))
        token = page.next_page_token
        if not token:
            break
    assert refs == sorted(e.key for e in server.pool.entries()) and len(refs) == 7 and sizes == [3, 3, 1]
    monkeypatch.setattr(runtime.service, "MAX_PAGE_SIZE", 4)
    for page_size in (0, 5):  # unset, or more than the largest page
        page = client.list_adapters(page_size=page_size)
        assert [a.ref for a in page.adapters] == refs[:4] and page.next_page_token == refs[3]


def test_metrics_bind_loopback_whatever_the_grpc_host(start_server):
    """/metrics has no auth or TLS: with gRPC on every interface it still binds 127.0.0.1, unless
    metrics_host (`hub serve --metrics-host`) says otherwise."""
    server, client = start_server(host="0.0.0.0", metrics_port=0)
    assert client.health() == "SERVING"
    assert server.metrics._http.server_address[0] == "127.0.0.1"
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    assert "adapterhub_requests_total" in text
    server, _ = start_server(metrics_port=0, metrics_host="0.0.0.0")
    assert server.metrics._http.server_address[0] == "0.0.0.0"
