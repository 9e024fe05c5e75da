"""The gRPC server: the base model, engine, adapter pool and scheduler behind `adapterhub.v1.Runtime`.

Besides the Runtime service it serves the standard health service and server reflection, so
stock tools (grpcurl, grpc_health_probe) work. It binds 127.0.0.1 unless told otherwise, caps
message sizes, checks bearer tokens in an interceptor (runtime/auth.py), speaks TLS when given a
certificate, and on stop refuses new RPCs while the ones in flight finish within a grace period.
"""
from __future__ import annotations

import ctypes
import gc
import signal
import socket
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hub import basemodel
from runtime.auth import TokenAuthInterceptor, read_token_file
from runtime.engine import Engine
from runtime.metrics import Metrics
from runtime.pool import AdapterPool
from runtime.proto.adapterhub.v1 import runtime_pb2 as pb
from runtime.proto.adapterhub.v1 import runtime_pb2_grpc as pb_grpc
from runtime.requestlog import RequestLog
from runtime.scheduler import Scheduler
from runtime.core import Limits, Serving
from runtime.service import RuntimeService
from runtime.techniques import REGISTRY

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Runtime"].full_name
SERVER_VERSION = "0.1.0"
MiB = 1 << 20
ADMIN_RPCS = 4  # LoadAdapter/UnloadAdapter in progress at once (a load may wait for adapter memory)
SPARE_THREADS = 8  # beyond those: Health, GetInfo, ListAdapters and reflection always find a thread
# RPCs accepted at once, per thread: past the threads they queue for one (those over a limit are refused as
# soon as a thread takes them), so a burst is answered, a probe in it included, rather than refused by gRPC
ACCEPTED_PER_THREAD = 4


class ServerConfigError(ValueError):
    """A server option that cannot work (bad TLS pair, unreadable token file, port in use...)."""


@dataclass
class ServerConfig:
    """Everything `hub serve` takes; the defaults are the documented ones."""

    base_model: str = basemodel.DEFAULT_BASE_MODEL
    host: str = "127.0.0.1"
    port: int = 50051
    registry: Path | None = None  # default: $HUB_HOME
    remote: str | None = None  # a remote name or URL to pull adapters the registry lacks
    preload: tuple[str, ...] = ()  # loaded and pinned at start
    adapter_memory: int = 1024 * MiB  # device tier, bytes
    host_adapter_memory: int | None = None  # host tier, bytes; default 4x adapter_memory
    adapter_wait_seconds: float = 30.0  # how long a request may wait for adapters in use to free device memory
    max_batch_size: int = 32
    max_queue: int = 128
    max_new_tokens: int = 1024
    max_adapters_per_request: int = 8
    dtype: str = "float32"
    device: str = "cpu"
    metrics_port: int | None = None
    http_port: int | None = None  # the OpenAI-compatible HTTP API (runtime/http.py); None: gRPC only
    http_host: str = "127.0.0.1"
    # vLLM's /v1/load_lora_adapter `lora_path`: the HTTP API may push a folder on this machine into the registry
    allow_runtime_lora: bool = False
    metrics_host: str = "127.0.0.1"  # /metrics has no auth or TLS: loopback whatever `host` is, unless told
    auth_token_file: Path | None = None
    auth_admin_only: bool = False  # with a token file: only LoadAdapter/UnloadAdapter need a token
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_bytes: int = 4 * MiB
    grace_seconds: float = 30.0
    max_adapter_labels: int = 32
    log_format: str = "off"  # one line per request on stderr: text, json or off (`hub serve` default: text)
    max_merged_adapters: int = 64  # per-request merges held on each tier (device, host), besides those in use

    def check(self) -> None:
        """ServerConfigError naming the first option out of its range (before anything loads or binds)."""
        ranges = (("--port", self.port, 0, 65535), ("--http-port", self.http_port, 0, 65535),
                  ("--metrics-port", self.metrics_port, 0, 65535),
                  ("--max-batch-size", self.max_batch_size, 1, None), ("--max-queue", self.max_queue, 0, None),
                  ("--max-new-tokens", self.max_new_tokens, 1, None),
                  ("max_adapters_per_request", self.max_adapters_per_request, 1, None),
                  ("--adapter-memory", self.adapter_memory, 0, None),
                  ("--host-adapter-memory", self.host_adapter_memory, 0, None),
                  ("--adapter-wait", self.adapter_wait_seconds, 0, None),
                  ("--grace", self.grace_seconds, 0, None), ("max_message_bytes", self.max_message_bytes, 1, None),
                  ("max_adapter_labels", self.max_adapter_labels, 0, None),
                  ("max_merged_adapters", self.max_merged_adapters, 1, None))
        if self.allow_runtime_lora and self.http_port is None:
            raise ServerConfigError("--allow-runtime-lora needs --http-port: it allows the HTTP API's `lora_path` "
                                    "loads (gRPC's LoadAdapter takes registry refs only)")
        if self.dtype not in basemodel.DTYPES:
            raise ServerConfigError(f"--dtype must be one of {', '.join(basemodel.DTYPES)}, got {self.dtype!r}")
        for name, value, low, high in ranges:
            if value is not None and (value < low or (high is not None and value > high)):
                bound = f"in {low}..{high}" if high is not None else f">= {low}"
                raise ServerConfigError(f"{name} must be {bound}, got {value}")


def check_device(device: str) -> None:
    """ServerConfigError unless torch can put a tensor on `device` here: checked before the base model
    loads, so `--device cuda` on a machine without one is one line, not a traceback after the load."""
    import torch

    try:
        torch.empty(1, device=torch.device(device))
    except (RuntimeError, AssertionError) as e:  # torch without CUDA raises AssertionError
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ServerConfigError(f"--device {device!r} cannot be used here: {reason}") from None


def check_port(host: str, port: int | None) -> None:
    """ServerConfigError if host:port cannot be bound: checked before the base model loads, so a port in
    use is one line at once, not after the load."""
    if not port:  # 0 picks a free one; None: not asked for
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no conflict
            probe.bind(address)
    except OSError as e:
        raise ServerConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def read_tokens(config: ServerConfig) -> dict[str, str] | None:
    """The tokens of --auth-token-file (None without one); a bad file is a ServerConfigError."""
    if config.auth_token_file is None:
        return None
    try:
        return read_token_file(config.auth_token_file)
    except ValueError as e:
        raise ServerConfigError(str(e)) from None


class RuntimeServer:
    """One running runtime. `model`/`tokenizer`/`registry` may be passed in (tests); else loaded from config."""

    def __init__(self, config: ServerConfig, *, model=None, tokenizer=None, registry=None) -> None:
        config.check()
        self.config = config
        tokens = read_tokens(config)
        interceptors = [TokenAuthInterceptor(tokens, admin_only=config.auth_admin_only)] if tokens else []
        credentials = self._tls_credentials()
        for port in (config.port, config.metrics_port):
            check_port(config.host, port)
        check_port(config.http_host, config.http_port)
        if model is None:
            check_device(config.device)
            model, tokenizer = basemodel.load(config.base_model, dtype=config.dtype, device=config.device)
        if registry is None:
            from hub.registry import Registry

            registry = Registry(config.registry)
        self.metrics = Metrics(config.max_adapter_labels)
        self.engine = Engine(model, tokenizer)
        self.scheduler = Scheduler(self.engine, max_batch_size=config.max_batch_size, max_queue=config.max_queue,
                                   metrics=self.metrics, label=self._seq_label)
        host_budget = config.host_adapter_memory if config.host_adapter_memory is not None else 4 * config.adapter_memory
        self.pool = AdapterPool(self.engine, registry, device_budget=config.adapter_memory, host_budget=host_budget,
                                metrics=self.metrics, on_engine=self.scheduler.call,
                                on_loading=self.scheduler.loading, remote=self._remote(registry),
                                wait_seconds=config.adapter_wait_seconds, max_merged=config.max_merged_adapters)
        limits = Limits(max_new_tokens=config.max_new_tokens, max_adapters_per_request=config.max_adapters_per_request,
                        context_length=int(getattr(model.config, "max_position_embeddings", 2048)))
        requests = config.max_batch_size + config.max_queue  # waiting for adapter memory counts against the queue
        self.core = Serving(self.engine, self.pool, self.scheduler, limits, registry=registry, max_requests=requests,
                            max_admin=ADMIN_RPCS)
        self.request_log = RequestLog(config.log_format)
        self.service = RuntimeService(self.core, self._info(limits), request_log=self.request_log)
        workers = requests + ADMIN_RPCS + SPARE_THREADS
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapterhub-rpc"),
                                interceptors=interceptors, options=options,
                                maximum_concurrent_rpcs=workers * ACCEPTED_PER_THREAD)
        pb_grpc.add_RuntimeServicer_to_server(self.service, self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        address = f"{config.host}:{config.port}"
        try:
            self.port = (self.grpc.add_secure_port(address, credentials) if credentials
                         else self.grpc.add_insecure_port(address))
        except RuntimeError as e:
            raise ServerConfigError(f"cannot listen on {address}: {e}") from None
        if not self.port:
            raise ServerConfigError(f"cannot listen on {address} (in use?)")
        self.metrics_port: int | None = None
        self.http = self.http_api(tokens) if config.http_port is not None else None
        self.http_port: int | None = None
        self._stopped = threading.Event()

    def http_api(self, tokens: dict[str, str] | None):
        """The HTTP API over this server's core (not started): `hub serve --http-port`, and each cluster replica's."""
        from runtime.http import HttpFrontend

        c = self.config
        names = (basemodel.hf_id(c.base_model) or c.base_model, c.base_model)
        return HttpFrontend(self.core, base_names=names, tokens=tokens, admin_only=c.auth_admin_only,
                            request_log=self.request_log, max_body_bytes=c.max_message_bytes,
                            tls=(str(c.tls_cert), str(c.tls_key)) if c.tls_cert and c.tls_key else None,
                            allow_lora_path=c.allow_runtime_lora)

    def _remote(self, registry):
        if self.config.remote is None:
            return None
        from hub.remotes import Remotes

        return Remotes(registry.root).open(self.config.remote)

    def _tls_credentials(self) -> grpc.ServerCredentials | None:
        cert, key = self.config.tls_cert, self.config.tls_key
        if cert is None and key is None:
            return None
        if cert is None or key is None:
            raise ServerConfigError("TLS needs both --tls-cert and --tls-key")
        try:
            return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
        except OSError as e:
            raise ServerConfigError(f"cannot read TLS files: {e}") from None

    def _info(self, limits: Limits) -> pb.GetInfoResponse:
        c = self.config
        return pb.GetInfoResponse(
            base_model=c.base_model, base_model_id=basemodel.hf_id(c.base_model),
            architecture_fingerprint=self.pool.base_fingerprint,
            dtype=str(self.engine.dtype).removeprefix("torch."), device=str(self.engine.device),
            limits=pb.Limits(max_batch_size=c.max_batch_size, max_queue=c.max_queue,
                             max_new_tokens=limits.max_new_tokens, context_length=limits.context_length,
                             max_adapters_per_request=limits.max_adapters_per_request,
                             adapter_memory_bytes=c.adapter_memory, max_message_bytes=c.max_message_bytes),
            techniques=sorted(t.value for t in REGISTRY), composition_modes=["stack", "average", "merge"],
            server_version=SERVER_VERSION,
        )

    def _seq_label(self, seq) -> str:
        keys = [use.key for use in seq.plan.adapters]
        return self.metrics.adapter_label(keys[0].split("@")[0]) if keys else "base"

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> RuntimeServer:
        """Preload (pinned), then start the loop, the metrics endpoint and the gRPC server."""
        for ref in self.config.preload:
            self.pool.load(ref, pin=True)
        self.scheduler.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.config.metrics_port, self.config.metrics_host)
        self.grpc.start()
        if self.http is not None:
            self.http_port = self.http.start(self.config.http_host, self.config.http_port)
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, let those in flight finish within `grace` seconds, then stop everything."""
        if self._stopped.is_set():
            return
        self.health.enter_graceful_shutdown()
        grace = self.config.grace_seconds if grace is None else grace
        stopping = self.grpc.stop(grace)
        if self.http is not None:
            self.http.stop(grace)
        stopping.wait()
        self.scheduler.stop(timeout=grace)
        self.metrics.close()
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory mapped, in one heap every thread shares (no-op elsewhere).

    By default glibc hands big freed blocks back to the kernel, so every new batch composition (its
    stacked adapter weights, megabytes per adapter) and every step's activations fault their pages
    back in, which makes a batch's compile several times slower.
    PyTorch's CPU performance guide suggests jemalloc/tcmalloc for the same reason; this is the
    dependency-free form: allocations up to 32 MiB come from the heap, and up to 512 MiB of free
    heap stays mapped for the next batch. One arena: glibc otherwise gives threads heaps of their own,
    so a cold load (in whichever RPC thread) rarely reused what the decode loop or other loads had freed
    and faulted in fresh pages instead, thousands per LoRA, slow in a VM.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * MiB)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 * MiB)  # M_TRIM_THRESHOLD
        libc.mallopt(-8, 1)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: its own allocator policy stands
        pass


def freeze_startup_heap() -> None:
    """Take everything alive now (the model, torch, transformers, gRPC: hundreds of thousands of objects) out of
    the cyclic GC.

    A full (generation 2) collection walks every tracked object with the GIL held, which stops the decode
    loop and every request thread for a long pause, at moments set by allocation counts (one landed inside a
    cold adapter load). Frozen objects are never scanned again (they are still freed by reference counting),
    so full collections only walk what was made since, a small part. vLLM freezes its startup heap the same
    way.
    """
    gc.collect()
    gc.freeze()


def until_signalled(ready) -> None:
    """Take SIGTERM and SIGINT, call `ready()`, and return once either came (so the caller stops gracefully);
    the handlers are in place before `ready` announces the server."""
    signalled = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: signalled.set())
    ready()
    while not signalled.wait(0.1):
        pass


def serve(config: ServerConfig, *, ready=None) -> int:
    """Run until SIGTERM or SIGINT, then stop gracefully; returns the exit status (0)."""
    keep_freed_memory()
    server = RuntimeServer(config)
    try:
        server.start()
    except BaseException:
        server.stop(grace=0)
        raise
    freeze_startup_heap()
    until_signalled(lambda: ready(server) if ready is not None else None)
    running, queued = server.scheduler.queue_depths()
    print(f"hub serve: stopping: {running} running and {queued} queued request(s) get up to "
          f"{config.grace_seconds:g} s to finish", file=sys.stderr, flush=True)
    server.stop()
    return 0
