"""`hub serve --replicas N` (runtime/cluster.py): a local Ray cluster of 2 replicas with fractional CPUs, one for
the whole module (a Ray start costs seconds), compared with a single in-process server on the same registry.

The tests run in file order and share the cluster: the fault and scaling tests come last (scaling leaves 1
replica). Ray is shut down at module teardown, and the last test checks no Ray process is left.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from server_support import ADAPTER_MIXES, served_model, wait_until

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
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cluster-auth") / "tokens"
    path.write_text(f"{ADMIN} admin\n{USER} user\n")
    return path


@pytest.fixture(scope="module")
def cluster(served_base, shared_registry, token_file):
    """2 replicas at half a CPU each, behind one endpoint with tokens and a 1 MiB message cap."""
    config = ServerConfig(base_model=str(served_base), port=0, registry=shared_registry.root,
                          auth_token_file=token_file, max_message_bytes=MAX_MESSAGE, grace_seconds=5)
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
def single(served_base, shared_registry):
    """One in-process server on the same base and registry: what the cluster must answer."""
    model, tokenizer = served_model(served_base)
    server = RuntimeServer(ServerConfig(base_model=str(served_base), port=0), model=model, tokenizer=tokenizer,
                           registry=shared_registry).start()
    with RuntimeClient(server.address, timeout=120) as c:
        yield c
    server.stop(grace=0)


def generate_on(client: RuntimeClient, prompt: str = PROMPT, **kwargs) -> tuple[pb.GenerateResponse, dict]:
    """A Generate and the trailing metadata that names its replica."""
    reply, call = client.stub.Generate.with_call(client.generate_request(prompt, **kwargs),
                                                 metadata=client._metadata, timeout=120)
    return reply, dict(call.trailing_metadata())


def request_router(cluster):
    """Serve's router in this process (the endpoint's handle). Serve has no public view of what it routes by;
    the tests read it to wait for an update rather than sleep."""
    return cluster.handle._router._asyncio_router.request_router


def replica_ids(cluster) -> set[str]:
    """The replicas the router sends to now."""
    return {replica.unique_id for replica in request_router(cluster).curr_replicas}


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
    assert routing_key("LoadAdapter", pb.LoadAdapterRequest(ref="a").SerializeToString()) == key(adapters=["a"])
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
    (dict(server=ServerConfig(http_port=8000)), "--http-port is not supported with --replicas"),
    (dict(server=ServerConfig(max_batch_size=0)), "--max-batch-size must be >= 1"),
])
def test_bad_cluster_options_are_one_line_before_ray_starts(bad, message):
    with pytest.raises(ServerConfigError, match=message):
        ClusterConfig(**bad).check()


def test_cli_refuses_cluster_options_it_cannot_honour(tmp_path):
    hub = Path(sys.executable).parent / "hub"
    for args, message in ((["--replicas", "2", "--http-port", "0"], "--http-port is not supported with --replicas"),
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


def routed_to(cluster, key: str) -> set[str]:
    """The replicas the router knows to hold `key` (a replica reports a new one within a push interval)."""
    return {replica.unique_id for replica in request_router(cluster)._multiplexed_model_id_to_replica_ids.get(key, ())}


def test_repeated_requests_for_an_adapter_land_on_the_replica_that_loaded_it(cluster, client):
    adapters = ["lora3", ("ia3", 0.5)]
    _, first = generate_on(client, adapters=adapters, max_new_tokens=4)
    key = routing_key("Generate", client.generate_request(PROMPT, adapters=adapters).SerializeToString())
    wait_until(lambda: routed_to(cluster, key) == {first[REPLICA_KEY]}, "Serve's router heard of the set")
    later = [generate_on(client, adapters=[("ia3", 0.5), "lora3"], max_new_tokens=4)[1] for _ in range(6)]
    assert {m[REPLICA_KEY] for m in later} == {first[REPLICA_KEY]}, (first[REPLICA_KEY], [m[REPLICA_KEY] for m in later])
    # ... where it is now a device hit: the replica's hit count grew by one per request
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


def test_a_push_and_a_tag_move_are_seen_by_every_replica(cluster, client, shared_registry, served_adapters,
                                                         served_base):
    shared_registry.push(served_adapters["lora1"], "moving", "1.0.0", base_model=str(served_base))
    shared_registry.tag("moving@1.0.0", "prod")

    def versions_on_both() -> dict[str, str]:
        seen: dict[str, str] = {}
        for _ in range(40):  # by load, as above
            reply, metadata = generate_on(client, adapters=["moving@prod"], max_new_tokens=2)
            seen[metadata[REPLICA_KEY]] = reply.adapters[0].version
            if len(seen) == 2:
                break
        return seen

    cluster.router.affinity = False  # so the requests reach both replicas
    try:
        assert set(versions_on_both().values()) == {"1.0.0"}
        shared_registry.push(served_adapters["lora2"], "moving", "2.0.0", base_model=str(served_base))
        shared_registry.tag("moving@2.0.0", "prod")
        after = versions_on_both()
    finally:
        cluster.router.affinity = True
    assert len(after) == 2 and set(after.values()) == {"2.0.0"}


def test_a_replica_killed_mid_traffic(cluster, client, single):
    """Its unary calls are retried on the other replica (same answers), its stream ends UNAVAILABLE, nothing
    hangs, Serve starts a replacement, and requests after it succeed."""
    adapters = [("lora3", 0.25)]  # a set no other test sends: one replica holds it
    want = single.generate(PROMPT, adapters=adapters, max_new_tokens=300)
    _, where = generate_on(client, adapters=adapters, max_new_tokens=2)
    key = routing_key("Generate", client.generate_request(PROMPT, adapters=adapters).SerializeToString())
    wait_until(lambda: routed_to(cluster, key) == {where[REPLICA_KEY]}, "Serve's router heard of the set")
    before, retried = replica_ids(cluster), cluster.retries
    results: list = []
    unary = threading.Thread(target=lambda: results.append(client.generate(PROMPT, adapters=adapters,
                                                                           max_new_tokens=300)))
    unary.start()
    stream = client.stub.GenerateStream(client.generate_request(PROMPT, adapters=adapters, max_new_tokens=1024),
                                        metadata=client._metadata, timeout=120)
    next(stream)
    next(stream)  # decoding: the replica is busy with it (and, by affinity, with the unary call)
    pid = int(dict(stream.initial_metadata())[REPLICA_PID_KEY])
    assert pid == int(where[REPLICA_PID_KEY])
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as ended:
        for _ in stream:
            pass
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "replica serving this stream stopped" in ended.value.details()
    unary.join(timeout=120)
    assert not unary.is_alive() and results and results[0].text == want.text
    assert cluster.retries == retried + 1  # the unary call, in the killed replica's batch, went once more
    wait_until(lambda: len(replica_ids(cluster)) == 2 and where[REPLICA_KEY] not in replica_ids(cluster),
               "Serve replaced the killed replica", limit=180)
    assert len(replica_ids(cluster) - before) == 1 and running() == 2
    reply, metadata = generate_on(client, adapters=adapters, max_new_tokens=300)
    assert reply.text == want.text and int(metadata[REPLICA_PID_KEY]) != pid


def test_scale_up_and_down_while_serving(cluster, client):
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
    before = replica_ids(cluster)
    load.start()
    try:
        cluster.scale(3)
        assert running() == 3
        wait_until(lambda: len(replica_ids(cluster)) == 3, "the router sends to 3 replicas")
        assert before < replica_ids(cluster)  # the replicas that were there kept running
        cluster.scale(1)
        wait_until(lambda: len(replica_ids(cluster)) == 1 and running() == 1, "Serve stopped two replicas", limit=120)
        assert replica_ids(cluster) < before | replicas
    finally:
        stop.set()
        load.join(timeout=120)
    assert not errors, errors[:3]
    assert replicas - before  # traffic reached replicas that started while it ran


def test_hub_serve_replicas_serves_and_leaves_no_ray_process(served_base, shared_registry, token_file):
    """The CLI end to end, as a process: one replica, a request, SIGTERM; its Ray processes are gone after."""
    hub = Path(sys.executable).parent / "hub"
    args = [str(hub), "serve", "--replicas", "1", "--replica-cpus", "0.5", "--base-model", str(served_base),
            "--registry", str(shared_registry.root), "--port", "0", "--auth-token-file", str(token_file), "--grace", "2"]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "listening on" not in line:
            line = process.stderr.readline()
            assert line or process.poll() is None, "hub serve --replicas exited before listening"
        address = line.rsplit("listening on ", 1)[1].strip()
        ray_pids = ray_children(process.pid)
        assert ray_pids, "a local Ray cluster runs under hub serve"
        with RuntimeClient(address, token=ADMIN, timeout=120) as c:
            assert c.generate(PROMPT, adapters=["lora0"], max_new_tokens=4).text
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
