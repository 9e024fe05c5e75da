"""`hub serve` (run the runtime) and `hub generate|score|adapters` (talk to one); mounted by `register(app)`."""
from __future__ import annotations

import functools
import json
import math
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer

from hub import basemodel
from hub.clikit import REF_ARG, fail, finite
from runtime.requestlog import LogFormat

SERVER_OPT = typer.Option("127.0.0.1:50051", "--server", envvar="HUB_SERVER", show_envvar=True,
                          help="host:port of a running `hub serve`.")
TOKEN_OPT = typer.Option(None, "--token-file", help="File whose first token is sent as `Bearer <token>`.")
CA_OPT = typer.Option(None, "--tls-ca", help="PEM certificate that signs the server's TLS certificate.")
JSON_OPT = typer.Option(False, "--json", help="Print the whole response as JSON.")
CHAT_OPT = typer.Option(False, "--chat", help="Wrap the text as a user message in the base model's chat template.")
ADAPTER_OPT = typer.Option([], "--adapter", "-a", callback=lambda values: [parse_adapter(v) for v in values],
                           help="REF or REF:WEIGHT (repeat for a stack; default: the base model alone).")
MODE_OPT = typer.Option("stack", "--mode", help="How several adapters combine: stack or average.")
MERGE_OPT = typer.Option(None, "--merge", help="Merge the adapters into one: METHOD[,density=D][,majority_sign=S]"
                         "[,svd_rank=R][,svd_clamp=Q][,seed=N], e.g. ties,density=0.5 (weights from -a REF:WEIGHT).")
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_bytes(option: str, text: str) -> int:
    """`1073741824`, `512MiB`, `1GB`... -> bytes; one error line naming the option otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        fail(f"{option}: {text!r} is not a size (e.g. 1073741824, 512MiB, 1GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_adapter(text: str) -> tuple[str, float] | str:
    """`REF` or `REF:WEIGHT` (names, versions and tags cannot hold ':')."""
    ref, sep, weight = text.rpartition(":")
    if not sep:
        return text
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise typer.BadParameter(f"{text!r}: the weight after ':' must be a finite number")
    return ref, value


def _top_p(value: float | None) -> float | None:
    value = finite(value)
    if value is not None and not 0 < value <= 1:
        raise typer.BadParameter(f"{value} is not in (0, 1]")
    return value


def _temperature(value: float | None) -> float | None:
    value = finite(value)
    if value is not None and value < 0:
        raise typer.BadParameter(f"{value} is negative")
    return value


def read_text(text: str) -> str:
    """`-` stands for standard input (a prompt too long or awkward for the command line)."""
    return sys.stdin.read() if text == "-" else text


@contextmanager
def _rpc_errors() -> Iterator[None]:
    """A failed RPC is one line: its status code and the server's message (or that no server answered)."""
    from runtime.client import RequestFailed

    try:
        yield
    except (RequestFailed, OSError, ValueError) as e:  # OSError/ValueError: e.g. an unreadable token file
        fail(str(e))


def _numbers(descriptor, data: dict) -> dict:
    """Proto3 JSON writes 64-bit integers as strings; a CLI's JSON gives them as the numbers they are."""
    from google.protobuf.descriptor import FieldDescriptor

    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        convert: Callable[[Any], Any]
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            convert = functools.partial(_numbers, field.message_type)
        elif field.cpp_type in (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64):
            convert = int
        else:
            continue
        data[field.name] = [convert(v) for v in value] if isinstance(value, list) else convert(value)
    return data


def _json(message) -> str:
    from google.protobuf.json_format import MessageToDict

    return json.dumps(_numbers(message.DESCRIPTOR, MessageToDict(message, preserving_proto_field_name=True)), indent=2)


def _client(server: str, token_file: Optional[Path], tls_ca: Optional[Path]):
    from runtime.client import RuntimeClient, read_token

    token = read_token(token_file) if token_file else None
    return RuntimeClient(server, token=token, tls_ca=tls_ca)


def serve(
    base_model: str = typer.Option(basemodel.DEFAULT_BASE_MODEL, "--base-model", help="Embedded name, folder or HF id."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 to accept remote clients)."),
    port: int = typer.Option(50051, "--port", min=0, max=65535, help="gRPC port (0 picks a free one)."),
    preload: list[str] = typer.Option([], "--preload", help="REF to load and pin at start (repeat, or comma-separate)."),
    adapter_memory: str = typer.Option("1GiB", "--adapter-memory", help="Device budget for adapters, bytes (512MiB...)."),
    host_adapter_memory: Optional[str] = typer.Option(None, "--host-adapter-memory",
                                                      help="Host-memory tier budget (default 4x --adapter-memory)."),
    adapter_wait: float = typer.Option(30.0, "--adapter-wait", min=0, callback=finite,
                                       help="Seconds a request may wait for adapters in use to free device memory."),
    max_batch_size: int = typer.Option(32, "--max-batch-size", min=1, help="Most requests decoded together."),
    max_queue: int = typer.Option(128, "--max-queue", min=0, help="Most requests waiting; more get RESOURCE_EXHAUSTED."),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", min=1, help="Largest max_new_tokens a request may ask."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1..."),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", min=0, max=65535,
                                               help="Serve Prometheus /metrics on this port."),
    http_port: Optional[int] = typer.Option(None, "--http-port", min=0, max=65535,
                                            help="Also serve the OpenAI-compatible HTTP API on this port."),
    http_host: str = typer.Option("127.0.0.1", "--http-host", help="Address the HTTP API binds."),
    allow_runtime_lora: bool = typer.Option(False, "--allow-runtime-lora", help="Let the HTTP API's "
                                            "/v1/load_lora_adapter push a `lora_path` folder of this machine into "
                                            "the registry (as vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING)."),
    metrics_host: str = typer.Option("127.0.0.1", "--metrics-host",
                                     help="Address /metrics binds (no auth or TLS: loopback whatever --host is)."),
    auth_token_file: Optional[Path] = typer.Option(None, "--auth-token-file",
                                                   help="Tokens, one per line: TOKEN, optionally followed by admin or user."),
    auth_admin_only: bool = typer.Option(False, "--auth-admin-only", help="Only Load/UnloadAdapter need a token."),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="PEM certificate: serve TLS (with --tls-key)."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert."),
    registry: Optional[Path] = typer.Option(None, "--registry", help="Registry folder (default: $HUB_HOME)."),
    remote: Optional[str] = typer.Option(None, "--remote", help="Remote to pull adapters the registry lacks."),
    log_format: LogFormat = typer.Option(LogFormat.text, "--log-format",
                                         help="One line per request on stderr: text, json, or off."),
    grace: float = typer.Option(30.0, "--grace", min=0, callback=finite,
                                help="Seconds in-flight requests get to finish on SIGTERM."),
    replicas: Optional[int] = typer.Option(None, "--replicas", min=1, help="Serve N replicas on Ray Serve behind "
                                           "this one endpoint, routed by adapter (docs/cluster.md; needs .[cluster])."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --replicas: join this Ray cluster "
                                              "(default: start a local one)."),
    replica_cpus: float = typer.Option(1.0, "--replica-cpus", min=0, callback=finite, help="CPUs per replica."),
    replica_gpus: float = typer.Option(0.0, "--replica-gpus", min=0, callback=finite, help="GPUs per replica."),
) -> None:
    """Serve adapters over gRPC (and HTTP with --http-port) on one resident base model, until SIGTERM/SIGINT."""
    from hub.errors import HubError
    from runtime.errors import ServeError
    from runtime.service import grpc_code
    from runtime.server import RuntimeServer, ServerConfig, ServerConfigError, serve as run

    config = ServerConfig(
        base_model=base_model, host=host, port=port, registry=registry,
        preload=tuple(r.strip() for item in preload for r in item.split(",") if r.strip()),
        adapter_memory=parse_bytes("--adapter-memory", adapter_memory),
        host_adapter_memory=parse_bytes("--host-adapter-memory", host_adapter_memory) if host_adapter_memory else None,
        adapter_wait_seconds=adapter_wait, max_batch_size=max_batch_size, max_queue=max_queue,
        max_new_tokens=max_new_tokens, dtype=dtype, device=device,
        metrics_port=metrics_port, metrics_host=metrics_host, http_port=http_port, http_host=http_host,
        allow_runtime_lora=allow_runtime_lora,
        auth_token_file=auth_token_file,
        auth_admin_only=auth_admin_only, tls_cert=tls_cert, tls_key=tls_key, remote=remote, grace_seconds=grace,
        log_format=log_format.value,
    )

    def ready(server: RuntimeServer) -> None:
        metrics = f", metrics on http://{metrics_host}:{server.metrics_port}/metrics" if server.metrics_port else ""
        http = f", HTTP API on http://{http_host}:{server.http_port}/v1" if server.http_port is not None else ""
        print(f"hub serve: {base_model} listening on {server.address}{http}{metrics}", file=sys.stderr, flush=True)

    if replicas is None and ray_address is not None:
        fail("--ray-address needs --replicas N")
    try:
        if replicas is not None:
            code = _serve_cluster(config, replicas, ray_address, replica_cpus, replica_gpus)
        else:
            code = run(config, ready=ready)
    except ServeError as e:
        fail(f"{grpc_code(e).name}: {e.message}")
    except (ServerConfigError, basemodel.BaseModelError, HubError) as e:
        fail(str(e))
    raise typer.Exit(code)


def _serve_cluster(config, replicas: int, ray_address: str | None, cpus: float, gpus: float) -> int:
    """`hub serve --replicas N` (runtime/cluster.py)."""
    try:
        from runtime.cluster import ClusterConfig, serve_cluster
    except ImportError as e:
        fail(f"--replicas needs Ray Serve: pip install -e '.[cluster]' ({e})")

    def ready(cluster) -> None:
        where = f"Ray at {ray_address}" if ray_address else "a local Ray cluster"
        http = f", HTTP API on http://{config.http_host}:{cluster.http_port}/v1" if cluster.http_port is not None else ""
        metrics = (f", metrics on http://{config.metrics_host}:{cluster.metrics_port}/metrics"
                   if cluster.metrics_port is not None else "")
        print(f"hub serve: {config.base_model} on {replicas} replica(s) ({where}) listening on {cluster.address}"
              f"{http}{metrics}", file=sys.stderr, flush=True)

    return serve_cluster(ClusterConfig(config, replicas=replicas, ray_address=ray_address, replica_cpus=cpus,
                                       replica_gpus=gpus), ready=ready)


_OPTION_TYPES = {"density": float, "majority_sign": str, "svd_rank": int, "svd_clamp": float, "seed": int}


def parse_merge_options(text: str):
    """The CLI's --merge, `METHOD[,density=D][,majority_sign=S][,svd_rank=R][,svd_clamp=Q][,seed=N]`, as MergeOptions."""
    method, *pairs = [p.strip() for p in text.split(",")]
    if not method or "=" in method:
        raise ValueError(f"--merge starts with the method (e.g. ties,density=0.5), got {text!r}")
    from runtime.proto.adapterhub.v1 import runtime_pb2 as pb

    options = pb.MergeOptions(method=method)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in _OPTION_TYPES:
            raise ValueError(f"--merge option {pair!r}: expected one of {', '.join(f'{k}=...' for k in _OPTION_TYPES)}")
        try:
            setattr(options, key, _OPTION_TYPES[key](value))
        except ValueError:
            raise ValueError(f"--merge option {key} takes a {_OPTION_TYPES[key].__name__}, got {value!r}") from None
    return options


def _mode_kwargs(mode: str, merge: str | None) -> dict:
    """--mode / --merge TEXT -> the client's mode (and merge options); one clear error for bad input."""
    if mode not in ("stack", "average"):
        fail(f"--mode must be stack or average, got {mode!r}")
    if merge is None:
        return {"mode": mode}
    if mode != "stack":
        fail("--merge replaces --mode: give one of them")
    try:
        return {"mode": "merge", "merge": parse_merge_options(merge)}
    except ValueError as e:
        fail(str(e))


def generate(
    prompt: str = typer.Argument(..., help="Prompt text; - reads it from standard input."),
    adapter: list[str] = ADAPTER_OPT,
    mode: str = MODE_OPT,
    merge: Optional[str] = MERGE_OPT,
    chat: bool = CHAT_OPT,
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1,
                                                 help="Most tokens to generate (server default: 64)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", callback=_temperature,
                                                help="Sampling temperature >= 0 (server default: 0, greedy)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", callback=_top_p,
                                          help="Nucleus sampling mass in (0, 1] (server default: 1, off)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=0, help="Sample from the k likeliest tokens "
                                        "(server default: 0, off)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0,
                                       help="Sampling seed, for repeatable samples (default: random)."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeat for several)."),
    stream: bool = typer.Option(False, "--stream", help="Print text as it is generated."),
    as_json: bool = JSON_OPT,
    server: str = SERVER_OPT, token_file: Optional[Path] = TOKEN_OPT, tls_ca: Optional[Path] = CA_OPT,
) -> None:
    """Generate with a running server, applying the named adapters."""
    kwargs = dict(adapters=adapter, chat=chat, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, **_mode_kwargs(mode, merge))
    with _rpc_errors(), _client(server, token_file, tls_ca) as client:
        if stream and not as_json:
            for chunk in client.generate_stream(read_text(prompt), **kwargs):
                typer.echo(chunk.text, nl=False)
            typer.echo()
            return
        reply = client.generate(read_text(prompt), **kwargs)
        if as_json:
            typer.echo(_json(reply))
        else:
            typer.echo(reply.text)


def score(
    text: str = typer.Argument(..., help="Text to score; - reads it from standard input."),
    adapter: list[str] = ADAPTER_OPT,
    mode: str = MODE_OPT,
    merge: Optional[str] = MERGE_OPT,
    chat: bool = CHAT_OPT,
    as_json: bool = JSON_OPT,
    server: str = SERVER_OPT, token_file: Optional[Path] = TOKEN_OPT, tls_ca: Optional[Path] = CA_OPT,
) -> None:
    """Per-token log-probabilities of TEXT under the named adapters: id, log-probability and the token's
    text (as a JSON string, so spaces and newlines show) per line; the total on the last line."""
    modes = _mode_kwargs(mode, merge)
    with _rpc_errors(), _client(server, token_file, tls_ca) as client:
        reply = client.score(read_text(text), adapters=adapter, chat=chat, **modes)
        if as_json:
            typer.echo(_json(reply))
            return
        texts = list(reply.tokens) or [""] * len(reply.token_ids)
        for token, logprob, piece in zip(reply.token_ids[1:], reply.logprobs, texts[1:]):
            typer.echo(f"{token}\t{logprob:.4f}\t{json.dumps(piece, ensure_ascii=False)}")
        typer.echo(f"total\t{reply.total_logprob:.4f}")


adapters_app = typer.Typer(help="Adapters held by a running server: list (the default), load (and pin), unload.")


def _list_adapters(as_json: bool, server: str, token_file: Optional[Path], tls_ca: Optional[Path]) -> None:
    from runtime.proto.adapterhub.v1 import runtime_pb2 as pb

    with _rpc_errors(), _client(server, token_file, tls_ca) as client:
        reply = client.list_all_adapters()
    if as_json:
        typer.echo(_json(reply))
        return
    typer.echo(f"device memory: {reply.device_used_bytes} / {reply.device_budget_bytes} bytes")
    now = time.time()
    for a in reply.adapters:
        tier = pb.Tier.Name(a.tier).removeprefix("TIER_").lower()
        line = (f"{a.ref:40} {a.technique:13} {tier:6} {a.size_bytes:>12} B  in use {a.in_use:<3} "
                f"served {a.requests_served:<5} last used {_ago(a.last_used_unix, now):9}  "
                f"{'pinned' if a.pinned else ''}{'  merge of ' + ' + '.join(a.parents) if a.parents else ''}")
        typer.echo(line.rstrip())


def _ago(unix: float, now: float) -> str:
    """'never', or how long ago in the largest whole unit (s, min, h, d)."""
    if not unix:
        return "never"
    seconds = max(0.0, now - unix)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


@adapters_app.callback(invoke_without_command=True)
def adapters_default(
    ctx: typer.Context, as_json: bool = JSON_OPT,
    server: str = SERVER_OPT, token_file: Optional[Path] = TOKEN_OPT, tls_ca: Optional[Path] = CA_OPT,
) -> None:
    """With no subcommand: list what the server holds."""
    if ctx.invoked_subcommand is None:
        _list_adapters(as_json, server, token_file, tls_ca)


@adapters_app.command("list")
def adapters_list(
    as_json: bool = JSON_OPT,
    server: str = SERVER_OPT, token_file: Optional[Path] = TOKEN_OPT, tls_ca: Optional[Path] = CA_OPT,
) -> None:
    """What the server holds: tier, size, requests running with it, requests served, last use, pinned."""
    _list_adapters(as_json, server, token_file, tls_ca)


@adapters_app.command("load")
def adapters_load(
    ref: str = REF_ARG, pin: bool = typer.Option(False, "--pin", help="Never evict it until unloaded."),
    server: str = SERVER_OPT, token_file: Optional[Path] = TOKEN_OPT, tls_ca: Optional[Path] = CA_OPT,
) -> None:
    """Load REF onto the server's device now (an admin RPC)."""
    with _rpc_errors(), _client(server, token_file, tls_ca) as client:
        reply = client.load_adapter(ref, pin=pin)
    typer.echo(f"loaded {reply.adapter.ref} ({reply.adapter.size_bytes} B) in {reply.load_seconds:.3f} s"
               f"{' (pinned)' if reply.adapter.pinned else ''}")


@adapters_app.command("unload")
def adapters_unload(
    ref: str = REF_ARG,
    server: str = SERVER_OPT, token_file: Optional[Path] = TOKEN_OPT, tls_ca: Optional[Path] = CA_OPT,
) -> None:
    """Unpin REF and drop it from the server's memory; it stays in the registry (an admin RPC)."""
    with _rpc_errors(), _client(server, token_file, tls_ca) as client:
        reply = client.unload_adapter(ref)
    typer.echo(f"unloaded {reply.adapter.ref}")


def scale(
    replicas: int = typer.Argument(..., min=1, help="How many replicas to run."),
    server: str = SERVER_OPT, token_file: Optional[Path] = TOKEN_OPT, tls_ca: Optional[Path] = CA_OPT,
) -> None:
    """Change the number of replicas of a running `hub serve --replicas N` while it serves (an admin RPC);
    returns once they run."""
    import grpc

    from runtime.client import RequestFailed

    with _rpc_errors(), _client(server, token_file, tls_ca) as client:
        try:
            reply = client.scale(replicas)
        except RequestFailed as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                fail(f"{server} serves one runtime, not `hub serve --replicas N`: it cannot scale")
            raise
    typer.echo(f"{reply.replicas} replica(s): {', '.join(reply.replica_ids)}")


def register(app: typer.Typer) -> None:
    """Mount the runtime commands on the `hub` app."""
    app.command("serve")(serve)
    app.command("generate")(generate)
    app.command("score")(score)
    app.command("scale")(scale)
    app.add_typer(adapters_app, name="adapters")
