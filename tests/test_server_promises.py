"""Server promises no other test reaches: a graceful stop, a registry error while serving, a deadline that passes
while a request decodes, and Score with a soft prompt against PEFT."""
from __future__ import annotations

import threading

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server_support import DEVICE, served_model, wait_until

PROMPT = "Hello there, adapters!"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def _generated(server) -> float:
    return sum(s.value for m in server.metrics.generated_tokens.collect() for s in m.samples
               if s.name.endswith("_total"))


def test_a_graceful_stop_reports_not_serving_refuses_new_calls_and_lets_in_flight_finish(start_server):
    server, client = start_server(max_new_tokens=4000)
    watch = health_pb2_grpc.HealthStub(client.channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                                    timeout=60)
    assert next(watch).status == SERVING
    stream = client.generate_stream(PROMPT, adapters=["lora0"], max_new_tokens=200)
    next(stream), next(stream)  # adapters chunk, then a token: decoding
    stopper = threading.Thread(target=server.stop, kwargs=dict(grace=600))
    stopper.start()
    assert next(watch).status == NOT_SERVING  # what a load balancer watching the server sees
    watch.cancel()  # an open watch is in flight too: the stop would wait for it

    def refused() -> bool:
        try:
            client.generate(PROMPT, max_new_tokens=1)
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), e  # gRPC's refusals
            return True
        return False

    wait_until(refused, "a new call is refused once the stop began")
    chunks = list(stream)  # the request in flight finishes within the grace period
    assert chunks[-1].finish_reason == "length"
    stopper.join()


def test_a_graceful_stop_cuts_what_is_still_running_at_the_grace_limit(start_server):
    server, client = start_server(max_new_tokens=4000)
    stream = client.generate_stream(PROMPT, adapters=["lora0"], max_new_tokens=4000)
    next(stream), next(stream)
    server.stop(grace=0.5)
    tokens: list[int] = []
    error = _refused(lambda: [tokens.extend(c.token_ids) for c in stream])
    assert error.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), error
    assert len(tokens) < 4000


def test_a_registry_error_while_serving_is_unavailable_and_clears_with_it(start_server, registry):
    """An index file that turns unreadable under a running server: requests naming its adapter get UNAVAILABLE
    (one line, naming the registry), a base request is still served, and once the file is whole again
    the adapter serves again."""
    _, client = start_server()
    index = registry.root / "refs" / "_" / "lora2" / "versions" / "1.0.0.json"
    whole = index.read_bytes()
    index.write_bytes(whole[: len(whole) // 2])
    error = _refused(lambda: client.generate(PROMPT, adapters=["lora2"], max_new_tokens=2))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "registry error" in error.details(), error.details()
    assert "\n" not in error.details()
    assert client.generate(PROMPT, max_new_tokens=2).finish_reason == "length"
    index.write_bytes(whole)
    assert client.generate(PROMPT, adapters=["lora2"], max_new_tokens=2).finish_reason == "length"


def test_a_deadline_passing_while_decoding_frees_the_row_and_the_adapter(start_server):
    """A unary Generate whose deadline passes mid-decode: the server takes the row out then (it has no stream
    to close, only the RPC's end), and lora0 is free again."""
    server, client = start_server(max_new_tokens=4000)
    error = _refused(lambda: client.generate(PROMPT, adapters=["lora0"], max_new_tokens=4000, timeout=1.0))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: server.scheduler.queue_depths() == (0, 0), "the expired request left the batch")
    assert 0 < _generated(server) < 4000  # it was decoding, and left because of the deadline, not at its end
    assert all(a.in_use == 0 for a in client.list_adapters().adapters)
    assert client.generate(PROMPT, adapters=["lora0"], max_new_tokens=2).finish_reason == "length"


def test_score_with_a_soft_prompt_equals_peft(start_server, served_base, served_adapters):
    """Score under prompt tuning: log-probabilities of the text's own tokens, the virtual tokens before them
    counted as context, not scored."""
    from peft import PeftModel

    _, client = start_server()
    reply = client.score(PROMPT, adapters=["prompt-tuning"])
    model, tokenizer = served_model(served_base)
    peft = PeftModel.from_pretrained(model, str(served_adapters["prompt_tuning"])).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = peft(input_ids=ids.to(DEVICE)).logits[0].float().cpu()
    virtual = peft.peft_config["default"].num_virtual_tokens
    assert logits.shape[0] == virtual + ids.shape[1]  # PEFT returns the virtual positions too
    expected = torch.log_softmax(logits[virtual:-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    assert list(reply.token_ids) == ids[0].tolist()
    assert torch.allclose(torch.tensor(list(reply.logprobs)), expected, atol=1e-5, rtol=0)
