"""`hub serve --replicas N`: N runtimes as Ray Serve replicas behind one `adapterhub.v1.Runtime` gRPC endpoint.

Each replica is a whole runtime (runtime/server.py: engine, adapter pool, scheduler) on one base model; it
serves the calls it is handed through its own loopback gRPC server, so a replica answers exactly what
`hub serve` answers. The endpoint is this process's gRPC server (bound where `hub serve` binds, with the
same token check and message size caps); it forwards the request bytes through a Serve deployment handle,
so Ray Serve does the routing, the replica health checks, the replacement of dead replicas and the scaling.
Serve's own gRPC proxy is not used: it binds every interface, and it routes by a header the client would
have to send, where here the route comes from the request itself.

Routing: a request's multiplexed model id is its canonical adapter set (`routing_key`), so Serve sends it to
a replica that served that set recently; requests without adapters carry no id and spread by load
(power of two choices), and so does a set with `spread_after` requests in flight already (`Router`), so a hot
adapter is not pinned to one replica. Serve's per-replica id cache only steers routing: adapter memory is the
replica's own ref-counted pool, so Serve's LRU eviction (which runs `__del__` on a model still in use) frees
nothing a request holds.

LoadAdapter and UnloadAdapter go to every replica, and ListAdapters gathers every replica's list
(runtime/fanout.py combines the replies); GetInfo is answered by one replica (all serve the same base).

Faults: a unary call whose replica dies (or is found unavailable) is sent once more, to a replica Serve
still has, and so is a stream whose replica dies before its first chunk reached the client; a Generate that
samples without a seed is given one first, so the retry gives the answer the first try would have. A stream
whose replica dies after that ends with UNAVAILABLE. Serve starts a replacement.
"""
from __future__ import annotations

import hashlib
import os
import random
import secrets
import sys
import tempfile
import threading
from collections import Counter
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from runtime.auth import TokenAuthInterceptor
from runtime.cluster_metrics import ClusterMetrics
from runtime.fanout import Part, Reply, combine
from runtime.proto.adapterhub.v1 import runtime_pb2 as pb
from runtime.server import SERVICE_NAME, ServerConfig, ServerConfigError, check_port, read_tokens, until_signalled

APP_NAME = "adapterhub"
DEPLOYMENT = "runtime"
REPLICA_KEY = "x-replica-id"  # trailing metadata: the Serve replica that answered
REPLICA_PID_KEY = "x-replica-pid"  # ... and its process id
DEVICE_HITS_KEY = "x-replica-device-hits"  # ... its adapter uses served from the device, since it started
DEVICE_MISSES_KEY = "x-replica-device-misses"  # ... and those that had to load (from host memory or disk)
UNARY = ("Generate", "Score", "GetInfo")  # each to one replica
EVERY_REPLICA = ("LoadAdapter", "UnloadAdapter", "ListAdapters")  # to all of them, one answer (runtime/fanout.py)
REQUESTS = {"Generate": pb.GenerateRequest, "GenerateStream": pb.GenerateRequest, "Score": pb.ScoreRequest}
FRONTEND_THREADS = 64  # calls forwarded at once; each waits on a replica, the work is there
SCRAPE_SECONDS = 10.0  # a /metrics scrape waits this long for the replicas' metrics (Prometheus' default timeout)


@dataclass
class ClusterConfig:
    """`hub serve --replicas N`: the runtime each replica runs, and how many of them where."""

    server: ServerConfig = field(default_factory=ServerConfig)  # host/port/auth/limits: the endpoint; the rest: each replica
    replicas: int = 2
    ray_address: str | None = None  # join this cluster; None: start a local one (stopped at exit)
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    affinity_slots: int = 64  # adapter sets each replica reports to Serve's router (its multiplexed LRU)
    spread_after: int | None = None  # in-flight requests of one adapter set past which it spreads; default batch size
    random_routing: bool = False  # no affinity at all: every request by load (for the benchmark's baseline)

    def check(self) -> None:
        """ServerConfigError naming the first option that cannot work, before Ray starts."""
        s = self.server
        if self.replicas < 1:
            raise ServerConfigError(f"--replicas must be >= 1, got {self.replicas}")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ServerConfigError("--replica-cpus and --replica-gpus must be >= 0")
        for name, value in (("--http-port", s.http_port), ("--tls-cert", s.tls_cert), ("--tls-key", s.tls_key)):
            if value is not None:
                raise ServerConfigError(f"{name} is not supported with --replicas yet (gRPC without TLS only)")
        s.check()


def routing_key(method: str, request: bytes) -> str:
    """The canonical adapter set a request names: sorted refs with weights, the mode and the merge spec
    ("" for none, and for the calls that name no adapter). Bytes that do not parse route by load, and the
    replica refuses them."""
    kind = REQUESTS.get(method)
    if kind is None:
        return ""
    try:
        msg = kind.FromString(request)
    except Exception:  # the replica's server gives the client its own error for them
        return ""
    if not msg.adapters:
        return ""
    mode = pb.CompositionMode.Name(msg.mode or pb.COMPOSITION_MODE_STACK).removeprefix("COMPOSITION_MODE_").lower()
    refs = sorted(f"{a.ref}:{a.weight if a.HasField('weight') else 1.0:g}" for a in msg.adapters)
    merge = msg.merge.SerializeToString(deterministic=True).hex() if mode == "merge" else ""
    return "|".join([mode, ",".join(refs)] + ([merge] if merge else []))


def seeded(method: str, request: bytes) -> bytes:
    """A Generate that samples without a seed, given a random one: a retry on another replica then draws
    the same tokens the first try would have."""
    if method not in ("Generate", "GenerateStream"):
        return request
    try:
        msg = pb.GenerateRequest.FromString(request)
    except Exception:
        return request
    s = msg.sampling
    if s.HasField("seed") or not (s.HasField("temperature") and s.temperature > 0):
        return request
    s.seed = random.getrandbits(63)
    return msg.SerializeToString()


class Router:
    """The multiplexed id for each request: its adapter set while fewer than `spread_after` requests of that
    set are in flight, else none (by load), so a hot set overflows onto other replicas."""

    def __init__(self, spread_after: int, *, affinity: bool = True) -> None:
        self.spread_after = spread_after
        self.affinity = affinity
        self._in_flight: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def route(self, key: str) -> Iterator[str]:
        """The id to send while the request runs ("" = route by load)."""
        with self._lock:
            busy = self._in_flight[key] >= self.spread_after
            self._in_flight[key] += 1
        try:
            yield key if key and self.affinity and not busy else ""
        finally:
            with self._lock:
                self._in_flight[key] -= 1
                if not self._in_flight[key]:
                    del self._in_flight[key]


class Affinity:
    """What Serve's multiplexed cache holds for an adapter set: the id alone, since the pool owns the memory."""

    def __init__(self, key: str) -> None:
        self.key = key


def replica_deployment(affinity_slots: int):
    """The Serve deployment class; built on demand so Ray is imported only by `hub serve --replicas`, and
    so its multiplexed cache size is the configured one (Serve reads it from the decorated method)."""
    from ray import serve

    @serve.deployment(name=DEPLOYMENT)
    class RuntimeReplica:
        """One whole runtime; its loopback server takes a secret token only this replica knows."""

        def __init__(self, config: ServerConfig) -> None:
            from runtime.server import RuntimeServer, keep_freed_memory

            keep_freed_memory()
            secret = secrets.token_urlsafe(24)
            self._folder = tempfile.TemporaryDirectory(prefix="adapterhub-replica-")
            token_file = Path(self._folder.name) / "token"
            token_file.write_text(f"{secret} admin\n")
            local = replace(config, host="127.0.0.1", port=0, auth_token_file=token_file, auth_admin_only=False,
                            http_port=None, metrics_port=None, tls_cert=None, tls_key=None)
            self.server = RuntimeServer(local).start()
            self._auth = (("authorization", f"Bearer {secret}"),)
            self._max_bytes = config.max_message_bytes
            self._channel = None
            self._id = (serve.get_replica_context().replica_id.unique_id, str(os.getpid()))

        def _stub(self):
            if self._channel is None:  # made on the replica's event loop, the one that uses it
                options = [("grpc.max_receive_message_length", self._max_bytes),
                           ("grpc.max_send_message_length", self._max_bytes)]
                self._channel = grpc.aio.insecure_channel(self.server.address, options=options)
            return self._channel

        @serve.multiplexed(max_num_models_per_replica=affinity_slots)
        async def affinity(self, key: str) -> Affinity:
            return Affinity(key)

        async def _noted(self) -> None:
            key = serve.get_multiplexed_model_id()
            if key:  # reported to the router: the next request for this set comes here
                await self.affinity(key)

        def _metadata(self, call_metadata) -> tuple[tuple[str, str], ...]:
            sample = self.server.metrics.registry.get_sample_value
            hits = sample("adapterhub_adapter_cache_hits_total", {"tier": "device"}) or 0
            host = sample("adapterhub_adapter_cache_hits_total", {"tier": "host"}) or 0
            misses = sample("adapterhub_adapter_cache_misses_total") or 0
            own = ((REPLICA_KEY, self._id[0]), (REPLICA_PID_KEY, self._id[1]),
                   (DEVICE_HITS_KEY, str(int(hits))), (DEVICE_MISSES_KEY, str(int(host + misses))))
            return tuple((k, v) for k, v in call_metadata or () if isinstance(v, str)) + own

        async def unary(self, method: str, request: bytes) -> Reply:
            await self._noted()
            call = self._stub().unary_unary(f"/{SERVICE_NAME}/{method}")(request, metadata=self._auth)
            try:
                payload = await call
            except grpc.aio.AioRpcError as e:
                return Reply(None, e.code().name, e.details() or "", self._metadata(e.trailing_metadata()))
            return Reply(payload, metadata=self._metadata(await call.trailing_metadata()))

        async def stream(self, request: bytes) -> AsyncIterator[Reply]:
            await self._noted()
            call = self._stub().unary_stream(f"/{SERVICE_NAME}/GenerateStream")(request, metadata=self._auth)
            try:
                first = True
                async for chunk in call:  # the first chunk names the replica (initial metadata of the stream)
                    yield Reply(chunk, metadata=self._metadata(await call.initial_metadata()) if first else ())
                    first = False
            except grpc.aio.AioRpcError as e:
                yield Reply(None, e.code().name, e.details() or "", self._metadata(e.trailing_metadata()))
                return
            finally:
                call.cancel()  # the caller went away: the local request leaves the batch too
            yield Reply(None, metadata=self._metadata(await call.trailing_metadata()))

        def metrics_text(self) -> tuple[str, str]:
            """This replica's id and its metrics now, in Prometheus' text format (the cluster's /metrics)."""
            from prometheus_client import generate_latest

            return self._id[0], generate_latest(self.server.metrics.registry).decode()

        def identity(self) -> tuple[str, str]:
            """This replica's Serve id and process id (what its answers' metadata names)."""
            return self._id

        def __del__(self) -> None:  # Serve stops the replica: finish what runs, briefly
            self.server.stop(grace=5)

    return RuntimeReplica


def _retryable() -> tuple[type[BaseException], ...]:
    """The errors that mean the replica (not the request) failed."""
    from ray.exceptions import RayActorError, WorkerCrashedError
    from ray.serve.exceptions import ReplicaUnavailableError

    return RayActorError, WorkerCrashedError, ReplicaUnavailableError


class Frontend:
    """The one gRPC endpoint: Runtime calls in, forwarded through the deployment handle."""

    def __init__(self, handle, router: Router, metrics: ClusterMetrics) -> None:
        self.handle = handle
        self.router = router
        self.metrics = metrics
        self.retryable = _retryable()

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {m: grpc.unary_unary_rpc_method_handler(self._unary_of(m)) for m in UNARY}
        methods.update({m: grpc.unary_unary_rpc_method_handler(self._everywhere_of(m)) for m in EVERY_REPLICA})
        methods["GenerateStream"] = grpc.unary_stream_rpc_method_handler(self.generate_stream)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)

    def _unary_of(self, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        return lambda request, context: self.unary(method, request, context)

    def _everywhere_of(self, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        return lambda request, context: self.everywhere(method, request, context)

    def everywhere(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Send a call to every replica Serve routes to now, and answer with their replies combined."""
        from ray.serve.exceptions import DeploymentUnavailableError

        try:
            replies = self.handle.broadcast("unary", method, request).results(timeout_s=_remaining(context),
                                                                               return_exceptions=True)
        except TimeoutError:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        except DeploymentUnavailableError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"no replica to send {method} to ({_why(e)})")
        parts = [Part(dict(r.metadata).get(REPLICA_KEY, ""), r.payload, r.code, r.details) if isinstance(r, Reply)
                 else Part("", None, "UNAVAILABLE", f"the replica stopped during the call ({_why(r)})")
                 for r in replies]
        return _answer(combine(method, request, parts), context)

    def unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Forward one call; sent once more when its replica dies under it."""
        from ray.serve.exceptions import RequestCancelledError

        request = seeded(method, request)
        with self.router.route(routing_key(method, request)) as model_id:
            for attempt in (1, 2):
                response = self.handle.options(multiplexed_model_id=model_id).unary.remote(method, request)
                context.add_callback(response.cancel)
                try:
                    reply = response.result(timeout_s=_remaining(context))
                except self.retryable as e:
                    if attempt == 1:
                        self.metrics.retries.labels(kind="unary").inc()
                        continue
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"the replicas serving this call stopped ({_why(e)}); "
                                  "retry it")
                except TimeoutError:
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                except RequestCancelledError:
                    context.abort(grpc.StatusCode.CANCELLED, "cancelled")
                return _answer(reply, context)
        raise AssertionError("unreachable")

    def generate_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Forward a stream. Its replica dying before the first chunk reached the client sends it once more to
        another replica (the same seed: the same tokens); after that, the stream ends with UNAVAILABLE (chunks
        already sent cannot be taken back)."""
        from ray.serve.exceptions import RequestCancelledError

        request = seeded("GenerateStream", request)
        with self.router.route(routing_key("GenerateStream", request)) as model_id:
            for attempt in (1, 2):
                chunks = self.handle.options(multiplexed_model_id=model_id, stream=True).stream.remote(request)
                context.add_callback(chunks.cancel)
                sent = False
                try:
                    for reply in chunks:
                        if reply.payload is None:
                            _answer(reply, context)
                            return
                        if reply.metadata:
                            context.send_initial_metadata(reply.metadata)
                        sent = True
                        yield reply.payload
                    return
                except self.retryable as e:
                    if attempt == 1 and not sent:
                        self.metrics.retries.labels(kind="stream").inc()
                        continue
                    context.abort(grpc.StatusCode.UNAVAILABLE,
                                  f"the replica serving this stream stopped ({_why(e)}); send the request again")
                except RequestCancelledError:
                    context.abort(grpc.StatusCode.CANCELLED, "cancelled")


def _remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left of the call's deadline; None without one (gRPC then reports a far-future time)."""
    left = context.time_remaining()
    return None if left is None or left > 1e6 else max(left, 0.0)


def _why(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _answer(reply: Reply, context: grpc.ServicerContext) -> bytes:
    """The replica's answer as this call's: its trailing metadata, then its payload or its status."""
    context.set_trailing_metadata(reply.metadata)
    if reply.code != "OK":
        context.abort(grpc.StatusCode[reply.code], reply.details)
    return reply.payload or b""


class Cluster:
    """Ray (started here, or joined), the Serve application of N replicas, and the gRPC endpoint."""

    def __init__(self, config: ClusterConfig) -> None:
        config.check()
        self.config = config
        s = config.server
        tokens = read_tokens(s)
        check_port(s.host, s.port)
        check_port(s.metrics_host, s.metrics_port)
        self._interceptors = [TokenAuthInterceptor(tokens, admin_only=s.auth_admin_only)] if tokens else []
        self._started_ray = False
        self.grpc: grpc.Server | None = None
        self.handle = None  # the deployment handle the endpoint forwards through
        self.frontend: Frontend | None = None
        self.port = 0
        self.metrics = ClusterMetrics(self._scrape)
        self.metrics_port: int | None = None
        self.router = Router(config.spread_after or s.max_batch_size, affinity=not config.random_routing)

    @property
    def address(self) -> str:
        return f"{self.config.server.host}:{self.port}"

    def _application(self, replicas: int):
        c = self.config
        options = {"num_cpus": c.replica_cpus, "num_gpus": c.replica_gpus}
        # A replica takes what its own server admits; past that Serve's router holds requests back or
        # sends them elsewhere, and a multiplexed request waits for a replica that holds its set only so long.
        ongoing = c.server.max_batch_size + c.server.max_queue
        # A version of our own: Serve gives a `serve.run` deployment a new one each time, which would replace
        # every replica on a change of num_replicas alone. Serve takes `version` only from its internal callers
        # (hence `_internal`, with ray pinned); it names what the replicas run, so equal configs keep replicas.
        version = hashlib.sha256(repr((c.server, c.affinity_slots, c.replica_cpus, c.replica_gpus)).encode())
        return replica_deployment(c.affinity_slots).options(
            num_replicas=replicas, ray_actor_options=options, max_ongoing_requests=ongoing,
            graceful_shutdown_timeout_s=5, health_check_period_s=2, health_check_timeout_s=30,
            version=version.hexdigest()[:16], _internal=True,
        ).bind(c.server)

    def start(self) -> Cluster:
        """Start (or join) Ray, deploy the replicas and wait for them, then open the endpoint."""
        import ray
        from ray import serve

        c = self.config
        if not ray.is_initialized():
            if c.ray_address:
                ray.init(address=c.ray_address, namespace=APP_NAME, logging_level="ERROR", log_to_driver=False)
            else:
                # address="local": a new cluster even where RAY_ADDRESS names one (a Ray driver sets it for its children)
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, c.replicas * c.replica_cpus),
                         include_dashboard=False,
                         namespace=APP_NAME, logging_level="ERROR", log_to_driver=False)
                self._started_ray = True
        # No Serve proxy: this process is the ingress, so nothing listens on every interface.
        serve.start(proxy_location="Disabled")
        self.handle = serve.run(self._application(c.replicas), name=APP_NAME, route_prefix=None)
        s = c.server
        options = [("grpc.max_receive_message_length", s.max_message_bytes),
                   ("grpc.max_send_message_length", s.max_message_bytes), ("grpc.so_reuseport", 0)]
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=FRONTEND_THREADS,
                                                           thread_name_prefix="adapterhub-cluster"),
                                interceptors=self._interceptors, options=options,
                                maximum_concurrent_rpcs=FRONTEND_THREADS * 4)
        self.frontend = Frontend(self.handle, self.router, self.metrics)
        self.grpc.add_generic_rpc_handlers((self.frontend.handler(),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self.port = self.grpc.add_insecure_port(f"{s.host}:{s.port}")
        if not self.port:
            raise ServerConfigError(f"cannot listen on {s.host}:{s.port} (in use?)")
        self.grpc.start()
        if s.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(s.metrics_port, s.metrics_host)
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        return self

    def replica_ids(self) -> set[str]:
        """The Serve ids of the replicas the endpoint routes to now (each answers for itself)."""
        answers = self.handle.broadcast("identity").results(timeout_s=60, return_exceptions=True)
        return {answer[0] for answer in answers if isinstance(answer, tuple)}  # not those that stopped meanwhile

    def _scrape(self) -> list[tuple[str, str]]:
        """(replica id, metrics text) of every replica that answers within the scrape's time."""
        if self.handle is None:
            return []
        texts = self.handle.broadcast("metrics_text").results(timeout_s=SCRAPE_SECONDS, return_exceptions=True)
        return [t for t in texts if isinstance(t, tuple)]

    def retries(self, kind: str = "unary") -> int:
        """Calls (`unary` or `stream`) sent a second time because the replica serving them stopped."""
        return int(self.metrics.registry.get_sample_value("adapterhub_cluster_retries_total", {"kind": kind}) or 0)

    def scale(self, replicas: int) -> None:
        """Change the number of replicas while serving; returns when Serve has that many running. The replicas
        that stay keep running (and keep their adapters); Serve drains those it stops."""
        from ray import serve

        if replicas < 1:
            raise ServerConfigError(f"replicas must be >= 1, got {replicas}")
        serve.run(self._application(replicas), name=APP_NAME, route_prefix=None)
        self.config.replicas = replicas

    def stop(self, grace: float | None = None) -> None:
        """Close the endpoint (calls in flight get `grace` seconds), delete the application, and stop Ray if
        it was started here."""
        import ray
        from ray import serve

        if self.grpc is not None:
            self.health.enter_graceful_shutdown()
            self.grpc.stop(self.config.server.grace_seconds if grace is None else grace).wait()
            self.grpc = None
        self.metrics.close()
        if ray.is_initialized():
            if self._started_ray:
                serve.shutdown()
                ray.shutdown()
            else:  # a shared cluster: take away this application only
                serve.delete(APP_NAME)


def serve_cluster(config: ClusterConfig, *, ready: Callable[[Cluster], None] | None = None) -> int:
    """Run until SIGTERM or SIGINT, then stop gracefully (Ray too, when started here); returns 0."""
    cluster = Cluster(config)
    try:
        cluster.start()
    except BaseException:
        cluster.stop(grace=0)
        raise
    until_signalled(lambda: ready(cluster) if ready is not None else None)
    print(f"hub serve: stopping {config.replicas} replica(s); calls in flight get up to "
          f"{config.server.grace_seconds:g} s", file=sys.stderr, flush=True)
    cluster.stop()
    return 0
