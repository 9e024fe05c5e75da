"""`hub serve --replicas N` (runtime/cluster.py): a local Ray cluster of 2 replicas with fractional CPUs, one for
the whole module (a Ray start costs seconds), compared with a single in-process server on the same registry.

The tests run in file order and share the cluster: the fault and scaling tests come last (scaling leaves 1
replica). Ray is shut down at module teardown, and the last test checks no Ray process is left.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from server_support import ADAPTER_MIXES, device_bytes, served_model, wait_until

pytest.importorskip("ray.serve", reason="the cluster extra: pip install -e '.[cluster]'")

from runtime.client import RequestFailed, RuntimeClient  # noqa: E402
from runtime.cluster import (APP_NAME, DEPLOYMENT, REPLICA_KEY, REPLICA_PID_KEY, Cluster, ClusterConfig,  # noqa: E402
                             Router, routing_key)
from runtime.proto.adapterhub.v1 import runtime_pb2 as pb  # noqa: E402
from runtime.server import RuntimeServer, ServerConfig, ServerConfigError  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(300)]
ADMIN, USER = "cluster-admin-token", "cluster-user-token"
PROMPT = "Hello there, cluster"
MIXES = dict(ADAPTER_MIXES, merge=dict(adapters=[("lora0", 0.5), ("lora1", 0.5)], mode="merge",
                                       merge=pb.MergeOptions(method="cat")))
MAX_MESSAGE = 1 << 20
HOLD = ("lora2", "lora3")  # adapters two long streams hold on one replica's device ...
WAIT = "lora1"  # ... while a request for this one waits there for room


@pytest.fixture(scope="module")
def shared_registry(tmp_path_factory, served_base, served_adapters):
    """The registry every replica and the single server read (a shared folder, as on one machine)."""
    from hub.registry import Registry

    reg = Registry(tmp_path_factory.mktemp("cluster") / "registry")
    for key, folder in served_adapters.items():
        if key not in ("other_base", "foreign"):
            reg.push(folder, key.replace("_", "-"), "1.0.0", base_model=str(served_base))
    return reg


@pytest.fixture(scope="module")
def remote_registry(tmp_path_factory):
    """The replicas' --remote (a directory remote): what their registry lacks is pulled from it."""
    from hub.registry import Registry

    return Registry(tmp_path_factory.mktemp("cluster-remote") / "remote")


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cluster-auth") / "tokens"
    path.write_text(f"{ADMIN} admin\n{USER} user\n")
    return path


@pytest.fixture(scope="module")
def adapter_memory(served_base, shared_registry) -> int:
    """A device budget that holds HOLD's adapters together, but not WAIT's with them (every test's set fits)."""
    from runtime.engine import Engine

    engine = Engine(*served_model(served_base))
    held = sum(device_bytes(engine, shared_registry, name) for name in HOLD)
    return held + device_bytes(engine, shared_registry, WAIT) // 2


@pytest.fixture(scope="module")
def cluster(served_base, shared_registry, remote_registry, token_file, adapter_memory):
    """2 replicas at half a CPU each, behind one endpoint with tokens, a 1 MiB message cap and /metrics."""
    config = ServerConfig(base_model=str(served_base), port=0, registry=shared_registry.root,
                          remote=str(remote_registry.root),
                          auth_token_file=token_file, max_message_bytes=MAX_MESSAGE, grace_seconds=5,
                          adapter_memory=adapter_memory, max_new_tokens=4000, metrics_port=0, http_port=0)
    started = Cluster(ClusterConfig(config, replicas=2, replica_cpus=0.5))
    daemons: list[int] = []
    try:
        started.start()
        daemons = ray_children(os.getpid())
        assert daemons, "the module's cluster runs Ray daemons under this process"
        yield started
    finally:
        started.stop(grace=0)
    wait_until(lambda: not any(alive(p) for p in daemons), "the module's Ray processes exited", limit=60)


@pytest.fixture(scope="module")
def client(cluster):
    with RuntimeClient(cluster.address, token=ADMIN, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def single(served_base, shared_registry, remote_registry):
    """One in-process server on the same base, registry and remote: what the cluster must answer."""
    model, tokenizer = served_model(served_base)
    config = ServerConfig(base_model=str(served_base), port=0, remote=str(remote_registry.root))
    server = RuntimeServer(config, model=model, tokenizer=tokenizer, registry=shared_registry).start()
    with RuntimeClient(server.address, timeout=120) as c:
        yield c
    server.stop(grace=0)


def generate_on(client: RuntimeClient, prompt: str = PROMPT, **kwargs) -> tuple[pb.GenerateResponse, dict]:
    """A Generate and the trailing metadata that names its replica."""
    reply, call = client.stub.Generate.with_call(client.generate_request(prompt, **kwargs),
                                                 metadata=client._metadata, timeout=120)
    return reply, dict(call.trailing_metadata())


def settled(client: RuntimeClient, fresh, tries: int = 6) -> tuple[dict, dict]:
    """Request kwargs for an adapter set that one replica alone holds, and that replica's metadata.

    The first request for a new set lands on some replica, which reports the set to Serve's router; a request
    sent before the report arrives may land on another replica, which then holds the set too. Serve shows
    no public view of what the router knows, so this waits for what clients see: after a pause, the next
    requests all land on the first one's replica. Otherwise it tries a fresh set (`fresh(i)`), pausing longer."""
    for i in range(tries):
        kwargs = fresh(i)
        _, first = generate_on(client, max_new_tokens=1, **kwargs)
        time.sleep(0.25 * 2 ** i)  # the replica's report reaches the router (pushed every 0.1 s)
        if all(generate_on(client, max_new_tokens=1, **kwargs)[1][REPLICA_KEY] == first[REPLICA_KEY]
               for _ in range(3)):
            return kwargs, first
    raise AssertionError(f"no adapter set settled on one replica in {tries} tries")


def running() -> int:
    """Replicas RUNNING, as Serve reports them."""
    from ray import serve

    return serve.status().applications[APP_NAME].deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)


# -- routing keys and the router, without Ray -------------------------------------------------------------------
def test_routing_key_is_the_canonical_adapter_set():
    def key(**kwargs) -> str:
        return routing_key("Generate", RuntimeClient.generate_request("x", **kwargs).SerializeToString())

    assert key(adapters=["b", ("a", 0.5)]) == key(adapters=[("a", 0.5), "b"]) == "stack|a:0.5,b:1"
    assert key() == ""  # no adapter: by load
    assert key(adapters=["a"]) != key(adapters=[("a", 2.0)]) != key(adapters=[("a", 2.0)], mode="average")
    linear, ties = (dict(adapters=["a", "b"], mode="merge", merge=pb.MergeOptions(method=m)) for m in ("linear", "ties"))
    assert key(**linear) != key(**ties) and key(**linear).startswith("merge|a:1,b:1|")
    assert routing_key("LoadAdapter", pb.LoadAdapterRequest(ref="a").SerializeToString()) == ""  # to every replica
    assert routing_key("Generate", b"\xff\xff not a message") == ""
    assert routing_key("GetInfo", b"") == ""


def test_a_hot_set_spreads_past_its_in_flight_limit():
    router = Router(2)
    with router.route("k") as first, router.route("k") as second, router.route("k") as third:
        assert (first, second, third) == ("k", "k", "")  # the third by load
        with router.route("other") as other:
            assert other == "other"
    with router.route("k") as again:
        assert again == "k"
    with Router(2, affinity=False).route("k") as unrouted:
        assert unrouted == ""


@pytest.mark.parametrize("bad, message", [
    (dict(replicas=0), "--replicas must be >= 1"),
    (dict(server=ServerConfig(tls_cert=Path("cert.pem"))), "--tls-cert is not supported with --replicas"),
    (dict(server=ServerConfig(max_batch_size=0)), "--max-batch-size must be >= 1"),
])
def test_bad_cluster_options_are_one_line_before_ray_starts(bad, message):
    with pytest.raises(ServerConfigError, match=message):
        ClusterConfig(**bad).check()


def test_cli_refuses_cluster_options_it_cannot_honour(tmp_path):
    hub = Path(sys.executable).parent / "hub"
    for args, message in ((["--replicas", "2", "--tls-cert", "c.pem"], "--tls-cert is not supported with --replicas"),
                          (["--ray-address", "auto"], "--ray-address needs --replicas N")):
        done = subprocess.run([str(hub), "serve", *args], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


# -- the cluster ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_answers_equal_a_single_servers(client, single, mix):
    kwargs = MIXES[mix]
    want = single.generate(PROMPT, max_new_tokens=12, **kwargs)
    got = client.generate(PROMPT, max_new_tokens=12, **kwargs)
    assert (got.text, list(got.token_ids), got.finish_reason) == (want.text, list(want.token_ids), want.finish_reason)
    assert [a.ref for a in got.adapters] == [a.ref for a in want.adapters]
    chunks = list(client.generate_stream(PROMPT, max_new_tokens=12, **kwargs))
    assert "".join(c.text for c in chunks) == want.text and chunks[-1].finish_reason == want.finish_reason
    score_kwargs = {k: v for k, v in kwargs.items() if k in ("adapters", "mode", "merge")}
    assert list(client.score(PROMPT, **score_kwargs).logprobs) == pytest.approx(
        list(single.score(PROMPT, **score_kwargs).logprobs), abs=1e-5)


def test_sampling_with_a_seed_equals_a_single_servers(client, single):
    kwargs = dict(adapters=["lora2"], max_new_tokens=12, temperature=1.5, seed=7)
    assert client.generate(PROMPT, **kwargs).text == single.generate(PROMPT, **kwargs).text


def test_repeated_requests_for_an_adapter_land_on_the_replica_that_loaded_it(client):
    kwargs, first = settled(client, lambda i: dict(adapters=[("lora3", 1 + i / 8), ("ia3", 0.5)]))
    swapped = dict(adapters=list(reversed(kwargs["adapters"])))  # the same set named in another order
    later = [generate_on(client, max_new_tokens=4, **swapped)[1] for _ in range(6)]
    assert {m[REPLICA_KEY] for m in later} == {first[REPLICA_KEY]}, (first[REPLICA_KEY], [m[REPLICA_KEY] for m in later])
    # ... where it is now a device hit: the replica's hit count grew by one per adapter and request
    assert int(later[-1]["x-replica-device-hits"]) >= int(first["x-replica-device-hits"]) + 2 * 6


def test_requests_without_adapters_spread_over_the_replicas(client):
    seen = set()
    for _ in range(40):  # by load: with equal queues Serve picks at random, so 40 tries miss one of 2 at 2**-39
        seen.add(generate_on(client, max_new_tokens=2)[1][REPLICA_KEY])
        if len(seen) == 2:
            break
    assert len(seen) == 2


def test_errors_come_back_as_the_replicas(client, single):
    with pytest.raises(RequestFailed) as cluster_error:
        client.generate(PROMPT, adapters=["no-such-adapter"])
    with pytest.raises(RequestFailed) as single_error:
        single.generate(PROMPT, adapters=["no-such-adapter"])
    assert cluster_error.value.code() == single_error.value.code() == grpc.StatusCode.NOT_FOUND
    assert cluster_error.value.details() == single_error.value.details()
    with pytest.raises(RequestFailed, match="max_new_tokens must be in"):
        client.generate(PROMPT, max_new_tokens=10**6)


def test_auth_and_size_limits_as_hub_serve(cluster):
    with RuntimeClient(cluster.address, timeout=60) as anonymous:
        assert anonymous.health() == "SERVING"  # probes need no token
        with pytest.raises(RequestFailed) as e:
            anonymous.generate(PROMPT, max_new_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with RuntimeClient(cluster.address, token=USER, timeout=60) as user:
        assert user.generate(PROMPT, max_new_tokens=2).text
        with pytest.raises(RequestFailed) as e:
            user.load_adapter("lora0")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(RequestFailed) as e:
            user.generate("x" * (MAX_MESSAGE + 1))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert cluster.address.startswith("127.0.0.1:")


def by_load(cluster, client: RuntimeClient, **kwargs) -> dict[str, tuple[pb.GenerateResponse, dict]]:
    """One request's reply and metadata on each replica, sent by load until every replica has answered one."""
    wanted, seen = cluster.replica_ids(), {}
    cluster.router.affinity = False
    try:
        for _ in range(60):  # with equal queues Serve picks at random: 60 tries miss one of 2 at 2**-59
            reply, metadata = generate_on(client, max_new_tokens=1, **kwargs)
            seen[metadata[REPLICA_KEY]] = reply, metadata
            if set(seen) == wanted:
                break
    finally:
        cluster.router.affinity = True
    assert set(seen) == wanted
    return seen


def test_load_and_unload_reach_every_replica(cluster, client, single):
    """LoadAdapter goes to every replica (the answer names them all); each then serves the adapter from the
    device (a hit, no miss); ListAdapters gathers the replicas' lists; UnloadAdapter takes it off every one."""
    replicas = cluster.replica_ids()
    reply, call = client.stub.LoadAdapter.with_call(pb.LoadAdapterRequest(ref="bottleneck", pin=True),
                                                    metadata=client._metadata, timeout=120)
    assert reply.adapter.ref == "bottleneck@1.0.0" and reply.adapter.pinned
    assert set(dict(call.trailing_metadata())["x-replica-ids"].split(",")) == replicas
    before = by_load(cluster, client)
    after = by_load(cluster, client, adapters=["bottleneck"])
    for replica in replicas:
        assert after[replica][1]["x-replica-device-misses"] == before[replica][1]["x-replica-device-misses"]
    listed = {a.ref: a for a in client.list_all_adapters().adapters}["bottleneck@1.0.0"]
    assert listed.pinned and listed.tier == pb.TIER_DEVICE and listed.requests_served >= len(replicas)
    assert client.list_adapters().device_budget_bytes == len(replicas) * cluster.config.server.adapter_memory
    assert client.unload_adapter("bottleneck").adapter.tier == pb.TIER_DISK
    listed = {a.ref: a for a in client.list_all_adapters().adapters}["bottleneck@1.0.0"]
    assert not listed.pinned and listed.tier == pb.TIER_DISK  # the nearest tier any replica has it on
    with pytest.raises(RequestFailed) as cluster_error:  # every replica refuses alike: one server's refusal
        client.load_adapter("no-such-adapter")
    with pytest.raises(RequestFailed) as single_error:
        single.load_adapter("no-such-adapter")
    assert (cluster_error.value.code(), cluster_error.value.details()) == \
        (single_error.value.code(), single_error.value.details())


def test_list_adapters_pages_through_every_replicas_adapters(client):
    whole = [a.ref for a in client.list_all_adapters().adapters]
    paged, token = [], ""
    while True:
        page = client.list_adapters(page_size=2, page_token=token)
        paged += [a.ref for a in page.adapters]
        token = page.next_page_token
        if not token:
            break
    assert paged == whole == sorted(set(whole)) and len(whole) >= 3


def versions(cluster, client: RuntimeClient, ref: str) -> set[str]:
    """The versions of `ref` the replicas serve now, one request on each."""
    return {reply.adapters[0].version for reply, _ in by_load(cluster, client, adapters=[ref]).values()}


def post(cluster, path: str, body: dict, token: str | None = ADMIN) -> tuple[int, dict, bytes]:
    """An HTTP API call to the cluster: (status, headers, body)."""
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{cluster.http_port}{path}", json.dumps(body).encode(),
                                     headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def sse_text(raw: bytes) -> str:
    """The text of an OpenAI completion stream's events."""
    events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["text"] for e in events if e["choices"])


def test_the_http_api_answers_as_a_single_server(cluster, single):
    want = single.generate(PROMPT, adapters=["lora0"], max_new_tokens=8).text
    body = {"model": "lora0", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    status, headers, raw = post(cluster, "/v1/completions", body)
    assert status == 200 and json.loads(raw)["choices"][0]["text"] == want
    assert headers.get("x-replica-id") in cluster.replica_ids()
    status, headers, raw = post(cluster, "/v1/completions", {**body, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream") and sse_text(raw) == want
    assert raw.decode().rstrip().endswith("data: [DONE]")
    status, _, raw = post(cluster, "/generate", {"inputs": PROMPT, "parameters": {"adapter_id": "lora0",
                                                                                  "max_new_tokens": 8}})
    assert status == 200 and json.loads(raw)["generated_text"] == want
    status, _, raw = post(cluster, "/v1/completions", {**body, "temperature": 1.0, "n": 2})  # seeded here: retryable
    assert status == 200 and len(json.loads(raw)["choices"]) == 2
    status, _, raw = post(cluster, "/v1/completions", {**body, "model": "no-such-adapter"})
    assert status == 404 and "no-such-adapter" in json.loads(raw)["error"]["message"]


def test_the_http_api_checks_tokens_and_sizes_and_loads_on_every_replica(cluster):
    body = {"model": "lora1", "prompt": PROMPT, "max_tokens": 2}
    assert post(cluster, "/v1/completions", body, token=None)[0] == 401
    assert post(cluster, "/v1/completions", body, token=USER)[0] == 200
    assert post(cluster, "/v1/load_lora_adapter", {"lora_name": "ia3"}, token=USER)[0] == 403
    too_large = http.client.HTTPConnection("127.0.0.1", cluster.http_port, timeout=60)  # refused on its length,
    too_large.putrequest("POST", "/v1/completions")  # before the body is sent
    too_large.putheader("authorization", f"Bearer {ADMIN}")
    too_large.putheader("content-length", str(MAX_MESSAGE + 1))
    too_large.endheaders()
    assert too_large.getresponse().status == 413
    too_large.close()
    status, headers, raw = post(cluster, "/v1/load_lora_adapter", {"lora_name": "ia3"})
    assert status == 200 and set(headers["x-replica-ids"].split(",")) == cluster.replica_ids(), raw
    status, _, raw = post(cluster, "/v1/unload_lora_adapter", {"lora_name": "no-such-adapter"})
    assert status == 404 and "no-such-adapter" in json.loads(raw)["error"]["message"]  # every replica's refusal
    status, _, raw = post(cluster, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp/x"})
    assert status == 400 and "lora_path" in json.loads(raw)["error"]["message"]


def test_a_push_and_a_tag_move_are_seen_by_every_replica(cluster, client, shared_registry, served_adapters,
                                                         served_base):
    shared_registry.push(served_adapters["lora1"], "moving", "1.0.0", base_model=str(served_base))
    shared_registry.tag("moving@1.0.0", "prod")
    assert versions(cluster, client, "moving@prod") == {"1.0.0"}
    shared_registry.push(served_adapters["lora2"], "moving", "2.0.0", base_model=str(served_base))
    shared_registry.tag("moving@2.0.0", "prod")
    assert versions(cluster, client, "moving@prod") == versions(cluster, client, "moving") == {"2.0.0"}


def test_a_push_and_a_tag_move_on_the_remote_are_seen_by_every_replica(cluster, client, remote_registry,
                                                                       served_adapters, served_base):
    """The replicas pull what their registry lacks from the remote; a name or a tag names what it names on the
    remote now, so a version pushed or a tag moved there is served by every replica's next request."""
    remote_registry.push(served_adapters["lora1"], "far", "1.0.0", base_model=str(served_base))
    remote_registry.tag("far@1.0.0", "prod")
    assert versions(cluster, client, "far@prod") == versions(cluster, client, "far") == {"1.0.0"}
    remote_registry.push(served_adapters["lora2"], "far", "2.0.0", base_model=str(served_base))
    assert versions(cluster, client, "far") == {"2.0.0"}
    assert versions(cluster, client, "far@prod") == {"1.0.0"}
    remote_registry.tag("far@2.0.0", "prod")
    assert versions(cluster, client, "far@prod") == {"2.0.0"}


def replica_metric(cluster, name: str, replica: str) -> float | None:
    """A replica's sample of `name`, as the cluster's /metrics serves it (labelled by replica)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=60) as r:
        text = r.read().decode()
    return next((s.value for family in text_string_to_metric_families(text) for s in family.samples
                 if s.name == name and s.labels.get("replica") == replica), None)


def test_metrics_serve_every_replica_labelled_by_replica(cluster, client):
    client.list_adapters()  # answered by every replica
    for replica in cluster.replica_ids():
        assert replica_metric(cluster, "adapterhub_adapter_memory_waiting", replica) == 0
        served = replica_metric(cluster, "adapterhub_requests_total", replica)
        assert served is not None and served > 0
    assert replica_metric(cluster, "adapterhub_cluster_replicas", None) == len(cluster.replica_ids())


def stream_of(client: RuntimeClient, **kwargs):
    return client.stub.GenerateStream(client.generate_request(PROMPT, **kwargs), metadata=client._metadata,
                                      timeout=120)


def test_a_replica_killed_mid_traffic(cluster, client, single, shared_registry, served_adapters, served_base):
    """One replica decodes two long streams (their first chunks sent) holding its device budget; a unary call,
    a stream and an HTTP call for an adapter that does not fit beside them wait there for room (nothing sent
    yet). The replica is killed: the two streams end UNAVAILABLE; the three waiting calls are sent once more,
    to the other replica, and answer as a single server does; Serve starts a replacement; requests after
    it succeed. All name the adapter by one tag (one adapter set, so one replica), moved between them."""
    for version, source in zip(("1.0.0", "2.0.0", "3.0.0"), HOLD + (WAIT,)):
        shared_registry.push(served_adapters[source], "held", version, base_model=str(served_base))
    want = single.generate(PROMPT, adapters=["held@3.0.0"], max_new_tokens=40)

    def fresh(i: int) -> dict:
        shared_registry.tag("held@1.0.0", f"kill{i}")
        return dict(adapters=[f"held@kill{i}"])

    kwargs, where = settled(client, fresh)
    replica, pid = where[REPLICA_KEY], int(where[REPLICA_PID_KEY])
    tag = kwargs["adapters"][0]
    holding = []
    for version in ("1.0.0", "2.0.0"):
        shared_registry.tag(f"held@{version}", tag.split("@")[1])
        stream = stream_of(client, max_new_tokens=4000, **kwargs)
        next(stream), next(stream)  # the adapters, then a token: decoding, holding the adapter
        assert int(dict(stream.initial_metadata())[REPLICA_PID_KEY]) == pid
        holding.append(stream)
    shared_registry.tag("held@3.0.0", tag.split("@")[1])
    before = cluster.replica_ids()
    retried = {kind: cluster.retries(kind) for kind in ("unary", "stream", "http")}
    results: list = []
    unary = threading.Thread(target=lambda: results.append(client.generate(PROMPT, max_new_tokens=40, **kwargs)))
    unary.start()
    waiting = stream_of(client, max_new_tokens=40, **kwargs)
    via_http: list = []
    over_http = threading.Thread(target=lambda: via_http.append(post(cluster, "/v1/completions", {
        "model": tag, "prompt": PROMPT, "max_tokens": 40, "temperature": 0})))
    over_http.start()
    wait_until(lambda: replica_metric(cluster, "adapterhub_adapter_memory_waiting", replica) == 3,
               "the gRPC call, the stream and the HTTP call wait for device room on the replica")
    os.kill(pid, signal.SIGKILL)
    for stream in holding:
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "replica serving this stream stopped" in ended.value.details()
    assert "".join(chunk.text for chunk in waiting) == want.text
    assert int(dict(waiting.initial_metadata())[REPLICA_PID_KEY]) != pid
    unary.join(timeout=120)
    assert not unary.is_alive() and results and results[0].text == want.text
    over_http.join(timeout=120)
    assert via_http and via_http[0][0] == 200 and json.loads(via_http[0][2])["choices"][0]["text"] == want.text
    assert int(via_http[0][1]["x-replica-pid"]) != pid
    assert {kind: cluster.retries(kind) - n for kind, n in retried.items()} == {"unary": 1, "stream": 1, "http": 1}
    wait_until(lambda: len(cluster.replica_ids()) == 2 and replica not in cluster.replica_ids(),
               "Serve replaced the killed replica", limit=180)
    assert len(cluster.replica_ids() - before) == 1 and running() == 2
    reply, metadata = generate_on(client, max_new_tokens=40, **kwargs)
    assert reply.text == want.text and int(metadata[REPLICA_PID_KEY]) != pid


def test_scale_is_an_admin_call_of_the_cluster_only(cluster, single, token_file):
    with RuntimeClient(cluster.address, token=USER, timeout=60) as user:
        with pytest.raises(RequestFailed) as e:
            user.scale(3)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with RuntimeClient(cluster.address, token=ADMIN, timeout=60) as admin:
        with pytest.raises(RequestFailed) as e:
            admin.scale(0)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "replicas must be >= 1" in e.value.details()
    hub = Path(sys.executable).parent / "hub"
    done = subprocess.run([str(hub), "scale", "2", "--server", single.target], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "serves one runtime, not `hub serve --replicas N`" in done.stderr
    assert len(cluster.replica_ids()) == 2


def test_scale_up_and_down_while_serving(cluster, client, token_file):
    """`hub scale 3`, then the Scale RPC down to 1, while requests keep coming: none fails, and the replica
    that started holds what the cluster had pinned."""
    errors: list[BaseException] = []
    replicas: set[str] = set()
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                replicas.add(generate_on(client, adapters=["lora0"], max_new_tokens=4)[1][REPLICA_KEY])
                replicas.add(generate_on(client, max_new_tokens=4)[1][REPLICA_KEY])
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)

    load = threading.Thread(target=traffic)
    generate_on(client, max_new_tokens=1)  # the handle's router starts with its first request
    assert client.load_adapter("bitfit", pin=True).adapter.pinned
    before = cluster.replica_ids()
    load.start()
    try:
        hub = Path(sys.executable).parent / "hub"
        done = subprocess.run([str(hub), "scale", "3", "--server", cluster.address, "--token-file", str(token_file)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert running() == 3 and len(cluster.replica_ids()) == 3
        assert done.stdout.startswith("3 replica(s): ") and set(done.stdout.split(": ")[1].strip().split(", ")) == \
            cluster.replica_ids()
        assert before < cluster.replica_ids()  # the replicas that were there kept running
        assert client.load_adapter("bitfit", pin=True).load_seconds == 0  # the new replica pinned it as it started
        # the router learns of new replicas on its own schedule: traffic reaches one before the scale-down
        wait_until(lambda: bool(replicas - before), "traffic reaches a replica that started while it ran", limit=120)
        reply = client.scale(1)
        assert reply.replicas == 1 and len(reply.replica_ids) == 1 and set(reply.replica_ids) < before | replicas
        wait_until(lambda: running() == 1, "Serve stopped two replicas", limit=120)
    finally:
        stop.set()
        load.join(timeout=120)
    assert not errors, errors[:3]
    assert replicas - before  # traffic reached replicas that started while it ran


def test_hub_serve_replicas_serves_and_leaves_no_ray_process(served_base, shared_registry, token_file):
    """The CLI end to end, as a process: one replica, a request, SIGTERM; its Ray processes are gone after."""
    hub = Path(sys.executable).parent / "hub"
    args = [str(hub), "serve", "--replicas", "1", "--replica-cpus", "0.5", "--base-model", str(served_base),
            "--registry", str(shared_registry.root), "--port", "0", "--auth-token-file", str(token_file), "--grace", "2",
            "--metrics-port", "0", "--http-port", "0"]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "listening on" not in line:
            line = process.stderr.readline()
            assert line or process.poll() is None, "hub serve --replicas exited before listening"
        address, http_api, metrics = re.fullmatch(r".* listening on (\S+), HTTP API on (\S+), metrics on (\S+)\s*",
                                                  line).groups()
        ray_pids = ray_children(process.pid)
        assert ray_pids, "a local Ray cluster runs under hub serve"
        with RuntimeClient(address, token=ADMIN, timeout=120) as c:
            assert c.generate(PROMPT, adapters=["lora0"], max_new_tokens=4).text
        with urllib.request.urlopen(metrics, timeout=60) as r:
            assert b'adapterhub_cluster_replicas 1.0' in r.read()
        models = urllib.request.Request(f"{http_api}/models", headers={"authorization": f"Bearer {ADMIN}"})
        with urllib.request.urlopen(models, timeout=60) as r:
            assert "lora0@1.0.0" in {card["id"] for card in json.loads(r.read())["data"]}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:  # a failure above: stop it as an operator would, so its Ray stops too
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    wait_until(lambda: not any(alive(p) for p in ray_pids), "the Ray processes of hub serve exited", limit=60)


def ray_children(parent: int) -> list[int]:
    """The Ray daemons (GCS, raylet) a process started: ray.init runs them as its children."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(") ", 1)[1].split()[1])
            args = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):  # not a process, or it has just exited
            continue
        if ppid == parent and (b"raylet" in args or b"gcs_server" in args):
            found.append(int(proc.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie has exited: it only waits for its parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
