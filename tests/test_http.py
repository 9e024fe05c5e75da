"""The OpenAI-compatible HTTP API (runtime/http.py) on a real server, through the `openai` SDK and plain httpx,
beside gRPC on the same engine."""
from __future__ import annotations

import json
import threading

import httpx2 as httpx  # the HTTP client the openai SDK itself uses
import openai
import pytest

from server_support import served_model, wait_until

from runtime.proto.adapterhub.v1 import runtime_pb2 as pb

PROMPT = "Hello there"


@pytest.fixture
def http_server(start_server):
    """(server, gRPC client, openai client, base url) with the HTTP API on a free port."""
    server, client = start_server(http_port=0)
    url = f"http://127.0.0.1:{server.http_port}/v1"
    sdk = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    yield server, client, sdk, url
    sdk.close()


def test_completion_matches_grpc_and_names_its_adapter(http_server):
    server, client, sdk, _ = http_server
    reply = sdk.completions.create(model="lora0", prompt=PROMPT, max_tokens=8, temperature=0)
    grpc_reply = client.generate(PROMPT, adapters=["lora0"], max_new_tokens=8, temperature=0.0)
    assert reply.choices[0].text == grpc_reply.text
    assert reply.model == "lora0"
    assert reply.usage.completion_tokens == len(grpc_reply.token_ids)
    assert reply.usage.prompt_tokens == grpc_reply.usage.prompt_tokens
    adapters = reply.model_extra["adapters"]
    assert [(a["ref"], a["sha256"]) for a in adapters] == [(a.ref, a.sha256) for a in grpc_reply.adapters]
    assert adapters[0]["ref"] == "lora0@1.0.0"
    assert server.metrics.requests.labels(frontend="http", method="/v1/completions", code="200")._value.get() == 1


def test_base_and_composed_adapters_through_extra_body(http_server):
    server, client, sdk, _ = http_server
    base = sdk.completions.create(model="base", prompt=PROMPT, max_tokens=6, temperature=0)
    assert base.choices[0].text == client.generate(PROMPT, max_new_tokens=6, temperature=0.0).text
    assert base.model_extra["adapters"] == []
    stacked = sdk.completions.create(model="base", prompt=PROMPT, max_tokens=6, temperature=0, extra_body={
        "adapters": [{"ref": "lora1", "weight": 1.0}, {"ref": "lora2", "weight": 3.0}], "mode": "average"})
    expected = client.generate(PROMPT, adapters=["lora1", ("lora2", 3.0)], mode="average", max_new_tokens=6,
                               temperature=0.0)
    assert stacked.choices[0].text == expected.text
    merged = sdk.completions.create(model="lora0", prompt=PROMPT, max_tokens=6, temperature=0, extra_body={
        "adapters": [{"ref": "lora1"}], "mode": "merge", "merge": {"method": "cat"}})
    assert [a["ref"] for a in merged.model_extra["adapters"]] == ["lora0@1.0.0", "lora1@1.0.0"]


def test_chat_uses_the_chat_template(http_server):
    server, client, sdk, _ = http_server
    reply = sdk.chat.completions.create(model="lora3", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                        temperature=0)
    expected = client.generate("hi", chat=True, adapters=["lora3"], max_new_tokens=6, temperature=0.0)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    newer = sdk.chat.completions.create(model="lora3", messages=[{"role": "user", "content": "hi"}],
                                        max_completion_tokens=3, temperature=0)  # chat's newer name for max_tokens
    assert newer.usage.completion_tokens == len(expected.token_ids[:3])


def test_streaming_with_usage_ends_with_done(http_server):
    server, client, sdk, url = http_server
    whole = sdk.completions.create(model="lora0", prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(sdk.completions.create(model="lora0", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    chat = list(sdk.chat.completions.create(model="lora0", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, temperature=0, stream=True))
    expected = client.generate("hi", chat=True, adapters=["lora0"], max_new_tokens=5, temperature=0.0)
    assert "".join(c.choices[0].delta.content or "" for c in chat) == expected.text
    with httpx.stream("POST", f"{url}/completions", json={"model": "base", "prompt": PROMPT, "max_tokens": 3,
                                                           "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_models_lists_the_base_and_the_registry(http_server, served_base):
    server, client, sdk, _ = http_server
    models = {m.id: m for m in sdk.models.list()}
    base = str(served_base)
    assert models[base].model_extra["parent"] is None
    for ref in ("lora0@1.0.0", "ia3@1.0.0", "prompt-tuning@1.0.0"):  # none of them loaded
        assert models[ref].model_extra["parent"] == base
    assert models["ia3@1.0.0"].model_extra["technique"] == "ia3"
    assert models["ia3@1.0.0"].model_extra["version"] == "1.0.0"
    assert "foreign@1.0.0" not in models  # pushed against another base: no client can name it here


def test_errors_are_openai_error_objects(http_server):
    server, client, sdk, url = http_server
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert "nope" in missing.value.message
    with pytest.raises(openai.BadRequestError):
        sdk.completions.create(model="lora0", prompt=PROMPT, max_tokens=2, temperature=-1)
    cases = [({"model": "lora0", "prompt": PROMPT, "top_p": 0}, 400, "top_p"),
             ({"model": "lora0", "prompt": PROMPT, "max_tokens": "x"}, 400, "max_tokens"),
             ({"model": "foreign", "prompt": PROMPT}, 409, "another base model"),
             ({"model": "lora0", "prompt": PROMPT, "mode": "sideways"}, 400, "composition mode"),
             # fields the server does not implement are refused, never silently ignored
             ({"model": "lora0", "prompt": PROMPT, "echo": True}, 400, "`echo` is not supported"),
             ({"model": "lora0", "prompt": PROMPT, "best_of": 3}, 400, "`best_of` is not supported"),
             ({"model": "lora0", "prompt": PROMPT, "presence_penalty": 0.5}, 400, "`presence_penalty`"),
             ({"model": "lora0", "prompt": PROMPT, "logit_bias": {"5": 10}}, 400, "`logit_bias`")]
    for body, status, words in cases:
        r = httpx.post(f"{url}/completions", json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert words in error["message"] and error["code"] == status
    neutral = {"model": "lora0", "prompt": PROMPT, "max_tokens": 2, "echo": False, "best_of": 1,
               "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "suffix": None}
    assert httpx.post(f"{url}/completions", json=neutral, timeout=60).status_code == 200  # asks for nothing extra
    r = httpx.post(f"{url}/completions", content=b"{not json", timeout=60)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/completions", content=b" " * (5 << 20), timeout=60)
    assert r.status_code == 413
    chunked = httpx.post(f"{url}/completions", content=iter([b" " * (1 << 20)] * 5), timeout=60)  # no length
    assert chunked.status_code == 413 and "4194304 bytes" in chunked.json()["error"]["message"]


def test_full_queue_is_429(start_server):
    server, _ = start_server(http_port=0, max_queue=0)
    r = httpx.post(f"http://127.0.0.1:{server.http_port}/v1/completions",
                   json={"model": "base", "prompt": PROMPT, "max_tokens": 2}, timeout=60)
    assert r.status_code == 429 and r.json()["error"]["type"] == "RateLimitError"


def test_bearer_token_from_the_token_file(start_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret user\n")
    server, _ = start_server(http_port=0, auth_token_file=tokens, token="s3cret")
    url = f"http://127.0.0.1:{server.http_port}/v1"
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 2}
    assert httpx.post(f"{url}/completions", json=body, timeout=60).status_code == 401
    wrong = httpx.post(f"{url}/completions", json=body, headers={"Authorization": "Bearer nope"}, timeout=60)
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "AuthenticationError"
    assert httpx.get(f"{url}/models", timeout=60).status_code == 401
    with openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0) as sdk:
        assert sdk.completions.create(model="base", prompt=PROMPT, max_tokens=2, temperature=0).usage.completion_tokens >= 1


def test_client_gone_mid_stream_frees_its_row(start_server):
    """The client leaves while the batch loop is held between two steps: the server lets go of its adapter
    hold and cancels its row before another step, and the row is out of the batch within one step of the
    loop resuming. (The row asks for 4000 tokens so that it is surely still running when the loop is held,
    however slowly this test's thread reads its first tokens.)"""
    from server_support import frozen

    server, client = start_server(http_port=0, max_new_tokens=4000)
    url = f"http://127.0.0.1:{server.http_port}/v1"
    generated = server.metrics.generated_tokens.labels(adapter="lora0")._value.get
    left = server.metrics.requests.labels(frontend="http", method="/v1/completions", code="499")._value.get
    body = {"model": "lora0", "prompt": PROMPT, "max_tokens": 4000, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # kept: httpx closes the response when this iterator goes (a for loop's break)
        texts = 0
        while texts < 2:
            line = next(lines)
            texts += line.startswith("data: ") and bool(json.loads(line[6:])["choices"][0]["text"])
        with frozen(server):  # no step runs until the end of this block
            assert server.scheduler.queue_depths() == (1, 0)  # still generating, its client still there
            made = generated()
            r.close()  # the client goes
            wait_until(lambda: left() == 1, "the server sees the client leave (status 499)")
            assert all(e.in_use == 0 for e in server.pool.entries())  # its adapter hold is already released
    wait_until(lambda: server.scheduler.queue_depths() == (0, 0), "the row of the client that left is freed")
    assert generated() - made <= 1 < 4000 - made  # the step under way when the loop resumed, no more


def test_http_and_grpc_clients_together_get_what_they_get_alone(http_server):
    server, client, sdk, _ = http_server
    mixes = ["lora0", "lora1", "ia3", "bitfit"]
    alone = {m: client.generate(PROMPT, adapters=[m], max_new_tokens=12, temperature=0.0).text for m in mixes}
    results: dict[str, str] = {}

    def over_http(m: str) -> None:
        results["http:" + m] = sdk.completions.create(model=m, prompt=PROMPT, max_tokens=12,
                                                      temperature=0).choices[0].text

    def over_grpc(m: str) -> None:
        results["grpc:" + m] = client.generate(PROMPT, adapters=[m], max_new_tokens=12, temperature=0.0).text

    threads = [threading.Thread(target=f, args=(m,)) for m in mixes for f in (over_http, over_grpc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {f"{kind}:{m}": alone[m] for m in mixes for kind in ("http", "grpc")}


def test_lorax_generate_and_stream(http_server):
    server, client, sdk, url = http_server
    root = url.removesuffix("/v1")
    body = {"inputs": PROMPT, "parameters": {"adapter_id": "lora2", "max_new_tokens": 7, "details": True}}
    reply = httpx.post(f"{root}/generate", json=body, timeout=60).json()
    expected = client.generate(PROMPT, adapters=["lora2"], max_new_tokens=7, temperature=0.0)  # greedy, as TGI
    assert reply["generated_text"] == expected.text
    assert reply["details"]["generated_tokens"] == len(expected.token_ids)
    assert reply["details"]["adapters"][0]["ref"] == "lora2@1.0.0"
    with httpx.stream("POST", f"{root}/generate_stream", json=body, timeout=60) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert "".join(e["token"]["text"] for e in events) == expected.text
    assert events[-1]["generated_text"] == expected.text and events[-1]["details"]["finish_reason"] == "length"
    merged = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "merged_adapters": {
        "ids": ["lora0", "lora1"], "weights": [0.5, 0.5], "merge_strategy": "ties_svd", "density": 0.5}}}  # ranks 4 and 8: LoRAX's ties needs one rank
    got = httpx.post(f"{root}/generate", json=merged, timeout=60)
    assert got.status_code == 200, got.text

    same = client.generate(PROMPT, adapters=[("lora0", 0.5), ("lora1", 0.5)], mode="merge", max_new_tokens=5,
                           temperature=0.0, merge=pb.MergeOptions(method="ties_svd", density=0.5))
    assert got.json()["generated_text"] == same.text
    unknown = httpx.post(f"{root}/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "nope"}},
                         timeout=60)
    assert unknown.status_code == 404  # never silently the base model


def _lorax_reasons(root: str, parameters: dict) -> tuple[dict, list[dict]]:
    """(the whole /generate answer, the /generate_stream events) for PROMPT with these parameters."""
    body = {"inputs": PROMPT, "parameters": {"details": True, **parameters}}
    whole = httpx.post(f"{root}/generate", json=body, timeout=120).json()
    with httpx.stream("POST", f"{root}/generate_stream", json=body, timeout=120) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    return whole, events


def _openai_reasons(sdk, **asked) -> tuple[str, str, str, str]:
    """(text, finish_reason) of a completion, whole then streamed."""
    whole = sdk.completions.create(prompt=PROMPT, temperature=0, **asked).choices[0]
    chunks = [c.choices[0] for c in sdk.completions.create(prompt=PROMPT, temperature=0, stream=True, **asked)
              if c.choices]
    return whole.text, whole.finish_reason, "".join(c.text for c in chunks), chunks[-1].finish_reason


def test_finish_reasons_tell_a_stop_string_from_eos_and_length(http_server, start_server, served_base):
    """LoRAX's finish_reason, whole and streamed: `stop_sequence` for a stop string, `eos_token` for EOS,
    `length` for max_new_tokens; OpenAI's says `stop` for the first two, as OpenAI and vLLM do."""
    server, client, sdk, url = http_server
    root = url.removesuffix("/v1")
    full = client.generate(PROMPT, adapters=["lora0"], max_new_tokens=30)
    stop = full.text[8:10]
    assert len(full.text) > 10 and stop
    cut = full.text[:full.text.index(stop)]
    whole, events = _lorax_reasons(root, {"adapter_id": "lora0", "max_new_tokens": 30, "stop": [stop]})
    assert whole["generated_text"] == cut and whole["details"]["finish_reason"] == "stop_sequence"
    assert "".join(e["token"]["text"] for e in events) == cut
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    assert _openai_reasons(sdk, model="lora0", max_tokens=30, stop=[stop]) == (cut, "stop", cut, "stop")
    whole, events = _lorax_reasons(root, {"adapter_id": "lora0", "max_new_tokens": 3})
    assert whole["details"]["finish_reason"] == events[-1]["details"]["finish_reason"] == "length"

    # a server whose EOS is the base's 4th greedy token (the served base never picks its own EOS)
    greedy = list(client.generate(PROMPT, max_new_tokens=8, temperature=0.0).token_ids)
    model, tokenizer = served_model(served_base)
    model.generation_config.eos_token_id = [model.config.eos_token_id, greedy[3]]
    eos_server, eos_client = start_server(http_port=0, model=(model, tokenizer))
    ended = eos_client.generate(PROMPT, max_new_tokens=8, temperature=0.0)
    assert list(ended.token_ids) == greedy[:greedy.index(greedy[3])] and ended.finish_reason == "stop"
    eos_root = f"http://127.0.0.1:{eos_server.http_port}"
    whole, events = _lorax_reasons(eos_root, {"max_new_tokens": 8})
    assert whole["generated_text"] == ended.text and whole["details"]["finish_reason"] == "eos_token"
    assert "".join(e["token"]["text"] for e in events) == ended.text
    assert events[-1]["details"]["finish_reason"] == "eos_token"
    with openai.OpenAI(base_url=f"{eos_root}/v1", api_key="unused", max_retries=0, timeout=120) as eos_sdk:
        assert _openai_reasons(eos_sdk, model="base", max_tokens=8) == (ended.text, "stop", ended.text, "stop")


def test_vllm_load_and_unload(http_server):
    server, client, sdk, url = http_server
    r = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "lora3"}, timeout=60)
    assert r.status_code == 200 and "lora3" in r.text
    assert {a.ref for a in client.list_adapters().adapters} == {"lora3@1.0.0"}
    r = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "lora3"}, timeout=60)
    assert r.status_code == 200
    assert all(a.tier == pb.TIER_DISK for a in client.list_adapters().adapters)  # off the device and host
    assert httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "lora3"}, timeout=60).status_code == 404
    assert httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "nope"}, timeout=60).status_code == 404


def test_vllm_load_with_a_path_needs_allow_runtime_lora(http_server, served_adapters):
    """A `lora_path` makes the server read a folder on its machine: without --allow-runtime-lora it is a 403
    naming the flag (as vLLM refuses runtime loads without VLLM_ALLOW_RUNTIME_LORA_UPDATING), and nothing is
    pushed or loaded."""
    server, client, sdk, url = http_server
    for path in (str(served_adapters["lora2"]), "/etc"):
        r = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "from-path", "lora_path": path}, timeout=60)
        assert r.status_code == 403 and "--allow-runtime-lora" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["type"] == "PermissionDeniedError"
    assert server.pool.registry.index().versions("from-path") == [] and client.list_adapters().adapters == []
    with pytest.raises(openai.PermissionDeniedError, match="--allow-runtime-lora"):
        sdk.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "/etc"}, cast_to=str)
    assert httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "lora3"}, timeout=60).status_code == 200


def test_vllm_load_with_a_path_pushes_it_first(start_server, served_adapters):
    """With --allow-runtime-lora, vLLM's `lora_path`: the folder is pushed into the registry as `lora_name` and
    loaded; then it is named like any adapter. A name that has versions needs one given."""
    server, client = start_server(http_port=0, allow_runtime_lora=True)
    url = f"http://127.0.0.1:{server.http_port}/v1"
    sdk = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    folder = str(served_adapters["lora2"])
    r = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "from-path", "lora_path": folder}, timeout=60)
    assert r.status_code == 200 and "as from-path@1.0.0" in r.text, r.text
    assert {a.ref for a in client.list_adapters().adapters} == {"from-path@1.0.0"}
    reply = sdk.completions.create(model="from-path", prompt=PROMPT, max_tokens=5, temperature=0)
    assert reply.choices[0].text == client.generate(PROMPT, adapters=["lora2"], max_new_tokens=5,
                                                    temperature=0.0).text
    again = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "from-path", "lora_path": folder}, timeout=60)
    assert again.status_code == 400 and "name@version" in again.json()["error"]["message"]
    r = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "from-path@2.0.0", "lora_path": folder},
                   timeout=60)
    assert r.status_code == 200 and "from-path@2.0.0" in r.text
    r = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nonexistent/x"}, timeout=60)
    assert r.status_code == 400 and "cannot push `lora_path` /nonexistent/x" in r.json()["error"]["message"]
    sdk.close()



def test_lorax_client(http_server):
    """`lorax-client` works by changing its URL (make setup installs it without its declared deps, see the
    Makefile)."""
    import lorax
    server, client, sdk, url = http_server
    lc = lorax.Client(url.removesuffix("/v1"), timeout=60)
    expected = client.generate(PROMPT, adapters=["lora1"], max_new_tokens=6, temperature=0.0)
    reply = lc.generate(PROMPT, adapter_id="lora1", max_new_tokens=6)
    assert reply.generated_text == expected.text and reply.details.generated_tokens == len(expected.token_ids)
    streamed = [r.token.text for r in lc.generate_stream(PROMPT, adapter_id="lora1", max_new_tokens=6)]
    assert "".join(streamed) == expected.text
    assert reply.details.finish_reason == lorax.types.FinishReason.Length
    stop = expected.text[2:4]
    assert len(expected.text) > 4
    stopped = lc.generate(PROMPT, adapter_id="lora1", max_new_tokens=6, stop_sequences=[stop])
    assert stopped.details.finish_reason == lorax.types.FinishReason.StopSequence
    assert stopped.generated_text == expected.text[:expected.text.index(stop)]
    merged = lorax.MergedAdapters(ids=["lora1"], weights=[0.5], merge_strategy="linear", density=1.0,
                                  majority_sign_method="total")  # the client sends both: linear uses neither
    same = client.generate(PROMPT, adapters=[("lora1", 0.5)], mode="merge", max_new_tokens=6,
                           temperature=0.0, merge=pb.MergeOptions(method="linear"))
    assert lc.generate(PROMPT, merged_adapters=merged, max_new_tokens=6).generated_text == same.text


def test_allow_runtime_lora_needs_the_http_api(start_server):
    from runtime.server import ServerConfigError

    with pytest.raises(ServerConfigError, match="--allow-runtime-lora needs --http-port"):
        start_server(allow_runtime_lora=True)


def test_tls_and_admin_token(start_server, tmp_path):
    """The HTTP API speaks TLS with the server's certificate, and load/unload need an admin token."""
    from test_server_security import _self_signed

    cert, key = _self_signed(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text("boss admin\nuser1 user\n")
    server, _ = start_server(http_port=0, tls_cert=cert, tls_key=key, tls_ca=cert, token="boss",
                             auth_token_file=tokens)
    url = f"https://localhost:{server.http_port}/v1"
    with openai.OpenAI(base_url=url, api_key="user1", max_retries=0,
                       http_client=httpx.Client(verify=str(cert))) as sdk:
        assert sdk.completions.create(model="base", prompt=PROMPT, max_tokens=2, temperature=0).usage.completion_tokens >= 1
    load = {"lora_name": "lora0"}
    user = httpx.post(f"{url}/load_lora_adapter", json=load, headers={"Authorization": "Bearer user1"},
                      verify=str(cert), timeout=60)
    assert user.status_code == 403
    admin = httpx.post(f"{url}/load_lora_adapter", json=load, headers={"Authorization": "Bearer boss"},
                       verify=str(cert), timeout=60)
    assert admin.status_code == 200
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP cannot talk to the TLS port
        httpx.get(f"http://localhost:{server.http_port}/v1/models", timeout=10).raise_for_status()


def test_stop_lets_an_http_request_in_flight_finish(start_server):
    """SIGTERM's graceful stop: a request already queued over HTTP still gets its whole answer."""
    from server_support import frozen

    server, client = start_server(http_port=0)
    url = f"http://127.0.0.1:{server.http_port}/v1"
    out: dict[str, httpx.Response] = {}
    request = threading.Thread(target=lambda: out.setdefault("r", httpx.post(
        f"{url}/completions", json={"model": "base", "prompt": PROMPT, "max_tokens": 5, "temperature": 0},
        timeout=120)))
    with frozen(server):
        request.start()
        wait_until(lambda: server.scheduler.queue_depths() == (0, 1), "the HTTP request is queued")
        stopping = threading.Thread(target=server.stop, kwargs={"grace": 60})
        stopping.start()
    request.join()
    stopping.join()
    assert out["r"].status_code == 200 and out["r"].json()["usage"]["completion_tokens"] == 5


def test_hub_serve_http_port_and_sigterm(served_base, registry):
    """`hub serve --http-port 0` names its HTTP URL on the start line; SIGTERM lets an HTTP stream run to its end."""
    import re
    import signal

    from test_server_process import ServeProcess

    serve = ServeProcess("--base-model", str(served_base), "--registry", str(registry.root), "--http-port", "0",
                         "--grace", "300", "--allow-runtime-lora")
    try:
        found = re.search(r"HTTP API on (http://127\.0\.0\.1:\d+/v1)", "".join(serve.lines))
        assert found, serve.lines
        pushed = httpx.post(f"{found[1]}/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nonexistent/x"},
                            timeout=60)  # --allow-runtime-lora reached the HTTP API: the push is tried
        assert pushed.status_code == 400 and "cannot push `lora_path`" in pushed.text, pushed.text
        body = {"model": "lora0", "prompt": PROMPT, "max_tokens": 300, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{found[1]}/completions", json=body, timeout=300) as r:
            lines = r.iter_lines()
            head = [next(lines), next(lines)]
            serve.proc.send_signal(signal.SIGTERM)  # while the stream runs
            events = [line for line in [*head, *lines] if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert serve.proc.wait(timeout=300) == 0
        serve.drain()
        assert "Traceback" not in "".join(serve.lines)
    finally:
        serve.kill()


def _scored(client, prompt_ids: list[int], output_ids: list[int], adapter: str) -> list[float]:
    """The Score RPC's logprobs of the output tokens after the prompt."""
    return list(client.score(token_ids=prompt_ids + output_ids, adapters=[adapter]).logprobs)[len(prompt_ids) - 1:]


def test_logprobs_are_the_engines_as_score_gives_them(http_server):
    """Completions' `logprobs: k`, chat's `logprobs`/`top_logprobs` and LoRAX's `details` carry each generated
    token's logprob as the Score RPC computes it on the same tokens, whole and streamed."""
    server, client, sdk, url = http_server
    grpc_reply = client.generate(PROMPT, adapters=["lora1"], max_new_tokens=6, temperature=0.0)
    prompt_ids = list(client.score(PROMPT, adapters=["lora1"]).token_ids)
    want = _scored(client, prompt_ids, list(grpc_reply.token_ids), "lora1")
    reply = sdk.completions.create(model="lora1", prompt=prompt_ids, max_tokens=6, temperature=0, logprobs=3)
    lp = reply.choices[0].logprobs
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs, want)) <= 1e-5 and len(lp.token_logprobs) == 6
    assert all(len(top) == 3 and max(top.values()) == pytest.approx(chosen, abs=1e-6)  # greedy: the likeliest
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    assert len(lp.tokens) == 6  # each token's own text (special tokens included, as vLLM reports them)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    streamed = [c.choices[0].logprobs for c in sdk.completions.create(
        model="lora1", prompt=prompt_ids, max_tokens=6, temperature=0, logprobs=3, stream=True) if c.choices]
    assert [v for c in streamed if c for v in c.token_logprobs] == lp.token_logprobs
    assert [v for c in streamed if c for v in c.text_offset] == lp.text_offset
    assert sdk.completions.create(model="lora1", prompt=PROMPT, max_tokens=2).choices[0].logprobs is None

    chat = sdk.chat.completions.create(model="lora1", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    chat_ids = list(client.score("hi", chat=True, adapters=["lora1"]).token_ids)
    chat_out = list(client.generate("hi", chat=True, adapters=["lora1"], max_new_tokens=4, temperature=0.0).token_ids)
    chat_want = _scored(client, chat_ids, chat_out, "lora1")
    assert max(abs(c.logprob - w) for c, w in zip(content, chat_want)) <= 1e-5 and len(content) == len(chat_out)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token and bytes(c.bytes).decode() == c.token
               for c in content)
    r = httpx.post(f"{url}/chat/completions", json={"model": "lora1", "messages": [{"role": "user", "content": "hi"}],
                                                    "top_logprobs": 2}, timeout=60)
    assert r.status_code == 400 and "logprobs: true" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/completions", json={"model": "lora1", "prompt": PROMPT, "logprobs": 21}, timeout=60)
    assert r.status_code == 400 and "0..20" in r.json()["error"]["message"]

    root = url.removesuffix("/v1")
    body = {"inputs": PROMPT, "parameters": {"adapter_id": "lora1", "max_new_tokens": 6, "details": True,
                                             "decoder_input_details": True, "top_n_tokens": 2}}
    details = httpx.post(f"{root}/generate", json=body, timeout=60).json()["details"]
    assert [t["logprob"] for t in details["tokens"]] == pytest.approx(want, abs=1e-5)
    assert [t["id"] for t in details["tokens"]] == list(grpc_reply.token_ids)
    prompt_want = list(client.score(PROMPT, adapters=["lora1"]).logprobs)
    assert [t["id"] for t in details["prefill"]] == prompt_ids and details["prefill"][0]["logprob"] is None
    assert [t["logprob"] for t in details["prefill"][1:]] == pytest.approx(prompt_want, abs=1e-5)
    assert all(len(top) == 2 for top in details["top_tokens"])
    with httpx.stream("POST", f"{root}/generate_stream", json=body, timeout=60) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert [e["token"]["logprob"] for e in events if not e["token"]["special"]] == pytest.approx(want, abs=1e-5)


def test_n_choices_each_with_its_own_seed(http_server):
    server, client, sdk, url = http_server
    asked = dict(model="lora0", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5)
    reply = sdk.completions.create(n=3, **asked)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    alone = [sdk.completions.create(**{**asked, "seed": 5 + i}).choices[0].text for i in range(3)]
    assert [c.text for c in reply.choices] == alone
    assert len(set(alone)) > 1  # three seed streams, not one answer three times
    assert reply.usage.completion_tokens == sum(
        sdk.completions.create(**{**asked, "seed": 5 + i}).usage.completion_tokens for i in range(3))
    chunks = list(sdk.chat.completions.create(model="lora0", messages=[{"role": "user", "content": "hi"}], n=2,
                                              max_tokens=4, temperature=1.0, seed=1, stream=True))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in (0, 1)}
    whole = sdk.chat.completions.create(model="lora0", messages=[{"role": "user", "content": "hi"}], n=2,
                                        max_tokens=4, temperature=1.0, seed=1)
    assert texts == {c.index: c.message.content for c in whole.choices}
    r = httpx.post(f"{url}/completions", json={**asked, "n": 17}, timeout=60)
    assert r.status_code == 400 and "1..16" in r.json()["error"]["message"]
    assert server.scheduler.queue_depths() == (0, 0)


def test_an_adapters_own_chat_template(http_server, served_adapters, served_base, tmp_path):
    """A chat request naming an adapter that ships a chat template is rendered with it; a template that does
    not render is refused at push with one line."""
    import shutil

    from hub.artifact import ArtifactError

    server, client, sdk, _ = http_server
    folder = tmp_path / "templated"
    shutil.copytree(served_adapters["lora0"], folder)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}<<{{ m.role }}>> {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<<assistant>>{% endif %}")
    server.pool.registry.push(folder, "templated", "1.0.0", base_model=str(served_base))
    messages = [{"role": "user", "content": "hi"}]
    reply = sdk.chat.completions.create(model="templated", messages=messages, max_tokens=4, temperature=0)
    rendered = "<<user>> hi\n<<assistant>>"
    expected = client.generate(rendered, adapters=["templated"], max_new_tokens=4, temperature=0.0)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    over_grpc = client.generate("hi", chat=True, adapters=["templated"], max_new_tokens=4, temperature=0.0)
    assert over_grpc.text == expected.text and over_grpc.usage.prompt_tokens == expected.usage.prompt_tokens
    base_template = sdk.chat.completions.create(model="lora0", messages=messages, max_tokens=4, temperature=0)
    assert base_template.usage.prompt_tokens != reply.usage.prompt_tokens
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}")
    with pytest.raises(ArtifactError, match="chat template does not render: .*nosuchfilter"):
        server.pool.registry.push(folder, "templated", "1.0.1", base_model=str(served_base))
