"""Every refusal is its gRPC status code with one clear message, and no bad request harms the server."""
from __future__ import annotations

import threading

import grpc
import pytest

from server_support import frozen, wait_until

from runtime.proto.adapterhub.v1 import runtime_pb2 as pb

PROMPT = "Hello"
CODE = grpc.StatusCode


def _refused(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, **kwargs)
        if not hasattr(result, "token_ids"):  # a stream: its error comes with the first read
            list(result)
    return caught.value


BAD_REQUESTS = [
    ("empty prompt", dict(), "the prompt is empty"),
    ("text and ids", dict(prompt=PROMPT, token_ids=[5, 6]), "not both"),
    ("id outside vocab", dict(token_ids=[5, 128]), "outside the vocabulary"),
    ("chat with ids", dict(token_ids=[5, 6], chat=True), "chat"),
    ("max_new_tokens 0", dict(prompt=PROMPT, max_new_tokens=0), "max_new_tokens"),
    ("max_new_tokens over limit", dict(prompt=PROMPT, max_new_tokens=100_000), "max_new_tokens"),
    ("negative temperature", dict(prompt=PROMPT, temperature=-0.5), "temperature"),
    ("nan temperature", dict(prompt=PROMPT, temperature=float("nan")), "temperature"),
    ("top_p 0", dict(prompt=PROMPT, top_p=0.0), "top_p"),
    ("top_p over 1", dict(prompt=PROMPT, top_p=1.5), "top_p"),
    ("empty stop string", dict(prompt=PROMPT, stop=[""]), "stop"),
    ("too many stop strings", dict(prompt=PROMPT, stop=[str(i) for i in range(9)]), "stop"),
    ("prompt past the context", dict(token_ids=[5] * 4096),
     "the prompt is 4096 tokens: no room is left for a new token within the context length 4096"),
    ("soft prompt pushes past the context", dict(token_ids=[5] * 4093, adapters=["prompt-tuning"]),
     "the prompt is 4097 tokens (4 of them soft prompt): no room"),
    ("too many adapters", dict(prompt=PROMPT, adapters=["lora0", "lora1", "lora2"]), "at most 2"),
    ("same adapter twice", dict(prompt=PROMPT, adapters=["lora0", "lora0@1.0.0"]), "named twice"),
    ("empty ref", dict(prompt=PROMPT, adapters=[""]), "empty"),
    ("malformed ref", dict(prompt=PROMPT, adapters=["../etc"]), "invalid adapter name"),
    ("infinite weight", dict(prompt=PROMPT, adapters=[("lora0", float("inf"))]), "finite"),
    ("average of weights summing to 0", dict(prompt=PROMPT, adapters=[("lora0", 1), ("lora1", -1)], mode="average"),
     "sum to 0"),
    ("weighted soft prompt", dict(prompt=PROMPT, adapters=[("prompt-tuning", 0.5)]), "soft prompts"),
]


@pytest.mark.parametrize("name,kwargs,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_invalid_argument(start_server, name, kwargs, message):
    server, client = start_server(max_adapters_per_request=2, max_new_tokens=512)
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", None)
    for call in (client.generate, client.generate_stream):
        error = _refused(call, prompt, **kwargs)
        assert error.code() == CODE.INVALID_ARGUMENT, error.details()
        assert message in error.details()
    assert server.scheduler.queue_depths() == (0, 0)
    assert all(e.in_use == 0 for e in server.pool.entries())  # a refused request holds nothing
    assert client.generate(PROMPT, max_new_tokens=2).finish_reason  # the server still answers


def test_score_invalid_argument(start_server):
    _, client = start_server()
    for kwargs, message in ((dict(text=""), "empty"), (dict(token_ids=[5]), "at least 2 tokens"),
                            (dict(text="hi", token_ids=[5, 6]), "not both"),
                            (dict(token_ids=[5] * 4097), "the prompt is 4097 tokens: that is past the context length")):
        error = _refused(client.score, **kwargs)
        assert error.code() == CODE.INVALID_ARGUMENT and message in error.details()


@pytest.mark.parametrize("ref,message", [("nobody", "no adapter named 'nobody'"),
                                         ("lora0@9.9.9", "lora0 has no version 9.9.9"),
                                         ("lora0@staging", "lora0 has no tag 'staging'")])
def test_not_found(start_server, ref, message):
    _, client = start_server()
    for error in (_refused(client.generate, PROMPT, adapters=[ref]), _refused(client.score, PROMPT, adapters=[ref]),
                  _refused(client.load_adapter, ref)):
        assert error.code() == CODE.NOT_FOUND and message in error.details()
    assert _refused(client.unload_adapter, "lora1").code() == CODE.NOT_FOUND  # known, but not loaded


def test_adapter_for_another_base_is_failed_precondition(start_server):
    """`foreign` fits the served shapes (q_proj 64x64) but was made for a base with another vocabulary:
    its recorded fingerprint differs, so it is refused rather than silently served."""
    server, client = start_server()
    error = _refused(client.generate, PROMPT, adapters=["foreign"])
    assert error.code() == CODE.FAILED_PRECONDITION
    assert "was made for another base model" in error.details()
    assert _refused(client.load_adapter, "foreign").code() == CODE.FAILED_PRECONDITION
    assert server.engine.resident() == {}


def test_damaged_stored_adapter_is_data_loss_and_others_still_serve(start_server, registry):
    """A blob whose bytes no longer match the manifest's sha256 is never served: DATA_LOSS naming it."""
    server, client = start_server()
    blob = registry.store.path(registry.resolve("lora0").files["adapter_model.safetensors"]["sha256"])
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    for error in (_refused(client.generate, PROMPT, adapters=["lora0"]), _refused(client.load_adapter, "lora0")):
        assert error.code() == CODE.DATA_LOSS and "lora0@1.0.0: adapter_model.safetensors" in error.details()
    assert "lora0" not in str(server.engine.resident())
    # damaged bytes never spare a later read its fit check
    assert "lora0@1.0.0" not in {key for key, _sha256 in server.pool._verified}
    assert client.generate(PROMPT, adapters=["lora1"], max_new_tokens=3).token_ids


def test_damaged_bytes_that_parse_as_another_adapter_are_data_loss_not_a_misfit(start_server, registry, tmp_path):
    """The hash runs while the adapter is parsed and checked; a refusal waits for it, so a blob replaced by a
    valid file of other shapes is reported as damaged, not as an adapter for another base."""
    import torch
    from safetensors.torch import save_file

    server, client = start_server()
    blob = registry.store.path(registry.resolve("lora0").files["adapter_model.safetensors"]["sha256"])
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    save_file({key.format("A"): torch.zeros(4, 3), key.format("B"): torch.zeros(5, 4)}, str(blob))
    error = _refused(client.generate, PROMPT, adapters=["lora0"])
    assert error.code() == CODE.DATA_LOSS and "lora0@1.0.0: adapter_model.safetensors" in error.details()
    assert "lora0" not in str(server.engine.resident())


def test_damaged_adapter_with_no_room_is_data_loss_not_resource_exhausted(start_server, registry):
    """Every refusal waits for the hash: with the whole budget held by a pinned adapter, a damaged one is
    still reported as damaged (the same request for it intact is RESOURCE_EXHAUSTED)."""
    _, probe = start_server()
    size = probe.load_adapter("lora3").adapter.size_bytes
    _, client = start_server(adapter_memory=size)
    client.load_adapter("lora3", pin=True)
    assert _refused(client.generate, PROMPT, adapters=["lora1"]).code() == CODE.RESOURCE_EXHAUSTED
    blob = registry.store.path(registry.resolve("lora1").files["adapter_model.safetensors"]["sha256"])
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    error = _refused(client.generate, PROMPT, adapters=["lora1"])
    assert error.code() == CODE.DATA_LOSS and "lora1@1.0.0: adapter_model.safetensors" in error.details()


def test_adapter_that_does_not_fit_is_failed_precondition(start_server, registry, served_adapters):
    """Pushed with no base to check against, an adapter for other shapes is caught at load, naming the module."""
    import json
    import shutil

    from helpers import save_peft_adapter, tiny_llama
    from peft import LoraConfig

    wide = save_peft_adapter(tiny_llama(hidden_size=32, num_attention_heads=2, num_key_value_heads=1),
                             LoraConfig(r=2, target_modules=["q_proj"]), served_adapters["lora0"].parent / "wide")
    config = json.loads((wide / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (wide / "adapter_config.json").write_text(json.dumps(config))
    registry.push(wide, "wide", "1.0.0")
    _, client = start_server()
    error = _refused(client.generate, PROMPT, adapters=["wide"])
    assert error.code() == CODE.FAILED_PRECONDITION and "q_proj" in error.details()
    shutil.rmtree(wide)


def test_adapter_larger_than_the_budget_is_resource_exhausted(start_server):
    _, client = start_server(adapter_memory=1000)
    error = _refused(client.generate, PROMPT, adapters=["lora3"])
    assert error.code() == CODE.RESOURCE_EXHAUSTED
    assert "more than the whole adapter memory budget (1000 bytes" in error.details()
    assert client.generate(PROMPT, adapters=["bitfit"], max_new_tokens=2).token_ids  # 512 bytes: fits


def test_full_queue_is_resource_exhausted(start_server):
    server, client = start_server(max_batch_size=1, max_queue=1)
    results: dict[str, object] = {}
    with frozen(server):
        first = threading.Thread(target=lambda: results.setdefault("first", client.generate(PROMPT, max_new_tokens=3)))
        first.start()
        wait_until(lambda: server.scheduler.queue_depths() == (0, 1), "the first request queued")
        error = _refused(client.generate, PROMPT, max_new_tokens=3)
        assert error.code() == CODE.RESOURCE_EXHAUSTED and "queue is full (1 waiting)" in error.details()
    first.join()
    assert results["first"].finish_reason == "length"


def test_deadline_exceeded_frees_the_place(start_server):
    server, client = start_server(max_batch_size=1, max_queue=1)
    with frozen(server):
        error = _refused(client.generate, PROMPT, max_new_tokens=3, timeout=0.3)
        assert error.code() == CODE.DEADLINE_EXCEEDED
        wait_until(lambda: server.scheduler.queue_depths() == (0, 0), "the expired request left the queue")
    assert client.generate(PROMPT, max_new_tokens=3).finish_reason == "length"


def test_cancelled_stream_frees_its_row(start_server):
    """With one row, a cancelled stream must leave the batch for the next request to run: the next one
    finishes while the cancelled one had thousands of tokens to go."""
    server, client = start_server(max_batch_size=1, max_new_tokens=4000)
    stream = client.generate_stream(PROMPT, adapters=["lora0"], max_new_tokens=4000)
    next(stream), next(stream)  # running
    waiting = {}
    with frozen(server):
        second = threading.Thread(target=lambda: waiting.setdefault("reply", client.generate(PROMPT, max_new_tokens=4)))
        second.start()
        wait_until(lambda: server.scheduler.queue_depths() == (1, 1), "the second request queued behind the first")
        stream.cancel()
    second.join()
    assert waiting["reply"].finish_reason == "length"
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert caught.value.code() == CODE.CANCELLED
    wait_until(lambda: all(e.in_use == 0 for e in server.pool.entries()), "the cancelled request let go of lora0")
    assert server.metrics.requests.labels(frontend="grpc", method="GenerateStream", code="CANCELLED")._value.get() == 1


def test_unload_of_an_adapter_in_use_is_refused(start_server):
    server, client = start_server(max_new_tokens=4000)
    stream = client.generate_stream(PROMPT, adapters=["lora0"], max_new_tokens=4000)
    next(stream)
    error = _refused(client.unload_adapter, "lora0")
    assert error.code() == CODE.FAILED_PRECONDITION and "in use by 1 running request" in error.details()
    stream.cancel()
    wait_until(lambda: all(e.in_use == 0 for e in server.pool.entries()), "the stream let go")
    assert client.unload_adapter("lora0").adapter.tier == pb.TIER_DISK
    assert server.engine.resident() == {}


@pytest.mark.parametrize("field,value", [("max_new_tokens", -5), ("top_k", -1), ("seed", -2)])
def test_client_names_the_sampling_field_it_cannot_send(field, value):
    """A value the wire format cannot hold (a negative count) is refused before sending, naming the field."""
    from runtime.client import RuntimeClient

    with pytest.raises(ValueError, match=f"^{field} = {value}: "):
        RuntimeClient.generate_request("hi", **{field: value})
