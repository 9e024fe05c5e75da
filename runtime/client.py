"""A Python client for the runtime: one method per RPC, with plain arguments instead of messages.

    from runtime.client import RuntimeClient
    with RuntimeClient("127.0.0.1:50051") as client:
        reply = client.generate("Hello", adapters=["support-bot@prod", ("sql", 0.5)], max_new_tokens=32)
        print(reply.text, reply.finish_reason, [a.ref for a in reply.adapters])

Errors come back as `RequestFailed` (a `grpc.RpcError`) with the status code, the server's message and
its request id (`x-request-id` metadata, as the server's request log names it); `ServerUnreachable`, a
kind of it, when nothing answers at the target.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, TypeVar, Union

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.proto.adapterhub.v1 import runtime_pb2 as pb
from runtime.proto.adapterhub.v1 import runtime_pb2_grpc as pb_grpc
from runtime.requestlog import REQUEST_ID_KEY

AdapterArg = Union[str, tuple[str, float], pb.AdapterSpec]
T = TypeVar("T")
# How gRPC words an UNAVAILABLE that never reached a server (the server's own UNAVAILABLE says otherwise).
_UNREACHED = ("failed to connect to all addresses", "errors resolving", "DNS resolution failed")
MODES = {"stack": pb.COMPOSITION_MODE_STACK, "average": pb.COMPOSITION_MODE_AVERAGE, "merge": pb.COMPOSITION_MODE_MERGE}


class RequestFailed(grpc.RpcError):
    """A failed RPC as `RuntimeClient` raises it: the status code and the server's message.

    It is a `grpc.RpcError` (with `code()` and `details()`), so code written against plain gRPC
    errors keeps working; `str()` is the one line the CLI prints, with the server's request id (the one
    its request log names) when it sent one.
    """

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str = "") -> None:
        super().__init__(f"{code.name}: {message}" + (f" (request id {request_id})" if request_id else ""))
        self.status_code = code
        self.message = message
        self.request_id = request_id

    def code(self) -> grpc.StatusCode:
        return self.status_code

    def details(self) -> str:
        return self.message


class ServerUnreachable(RequestFailed):
    """No server answered at the target (nothing listens there, or the name does not resolve)."""

    def __init__(self, target: str, reason: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, f"cannot reach server at {target}")
        self.target = target
        self.reason = reason  # gRPC's own words, e.g. "Connection refused"

    def __str__(self) -> str:
        return self.message


def adapter_specs(adapters: Iterable[AdapterArg]) -> list[pb.AdapterSpec]:
    """`"ref"`, `("ref", weight)` or AdapterSpec -> AdapterSpec messages."""
    specs = []
    for a in adapters:
        if isinstance(a, pb.AdapterSpec):
            specs.append(a)
        elif isinstance(a, str):
            specs.append(pb.AdapterSpec(ref=a))
        else:
            ref, weight = a
            specs.append(pb.AdapterSpec(ref=ref, weight=float(weight)))
    return specs


@contextmanager
def _translated(target: str) -> Iterator[None]:
    """grpc.RpcError -> RequestFailed (ServerUnreachable when no server answered)."""
    try:
        yield
    except RequestFailed:
        raise
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE and any(s in details for s in _UNREACHED):
            raise ServerUnreachable(target, details) from None
        raise RequestFailed(code, details, request_id(e)) from None


def request_id(error: grpc.RpcError) -> str:
    """The server's id of a failed call (`x-request-id` in its trailing metadata); "" when it sent none."""
    trailing = error.trailing_metadata() if isinstance(error, grpc.Call) else None
    return next((value for key, value in trailing or () if key == REQUEST_ID_KEY), "")


class Stream:
    """The chunks of a GenerateStream call as they arrive, errors as RequestFailed; `cancel()` ends it."""

    def __init__(self, call: grpc.Call, target: str) -> None:
        self._call, self._target = call, target

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> pb.GenerateChunk:
        with _translated(self._target):
            return next(self._call)

    def cancel(self) -> bool:
        return self._call.cancel()


def read_token(path: str | Path) -> str:
    """The first token of a token file (the server's format: `TOKEN [role]` per line)."""
    for line in Path(path).read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            return fields[0]
    raise ValueError(f"token file {path} holds no token")


class RuntimeClient:
    """A channel to one server. `token`: bearer token; `tls_ca`: PEM file that signs the server's certificate."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None,
                 tls_ca: str | Path | None = None, tls_server_name: str | None = None,
                 timeout: float | None = None, max_message_bytes: int = 4 << 20) -> None:
        options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if tls_ca is not None:
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.RuntimeStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.target = target

    def __enter__(self) -> RuntimeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, rpc: Callable[..., T], request, timeout: float | None) -> T:
        """One unary RPC with this client's token and timeout, its failure as RequestFailed."""
        with _translated(self.target):
            return rpc(request, metadata=self._metadata, timeout=timeout if timeout is not None else self.timeout)

    @staticmethod
    def generate_request(prompt: str | None = None, *, token_ids: Iterable[int] = (),
                         adapters: Iterable[AdapterArg] = (), mode: str = "stack", chat: bool = False,
                         max_new_tokens: int | None = None, temperature: float | None = None,
                         top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                         stop: Iterable[str] = (), merge: pb.MergeOptions | None = None) -> pb.GenerateRequest:
        sampling = pb.SamplingParams(stop=list(stop))
        for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p),
                            ("top_k", top_k), ("seed", seed)):
            if value is not None:
                try:
                    setattr(sampling, name, value)
                except (ValueError, TypeError) as e:  # e.g. a negative count for an unsigned field
                    raise ValueError(f"{name} = {value!r}: {e}") from None
        return pb.GenerateRequest(prompt=prompt or "", prompt_token_ids=list(token_ids),
                                  adapters=adapter_specs(adapters), mode=MODES[mode], chat=chat, sampling=sampling,
                                  merge=merge)

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> pb.GenerateResponse:
        """The whole completion; kwargs as `generate_request`."""
        return self._call(self.stub.Generate, self.generate_request(prompt, **kwargs), timeout)

    def generate_stream(self, prompt: str | None = None, *, timeout: float | None = None,
                        **kwargs) -> Stream:
        """Chunks as they are generated; the returned stream also has `.cancel()`."""
        return Stream(self._call(self.stub.GenerateStream, self.generate_request(prompt, **kwargs), timeout),
                      self.target)

    def score(self, text: str | None = None, *, token_ids: Iterable[int] = (), adapters: Iterable[AdapterArg] = (),
              mode: str = "stack", merge: pb.MergeOptions | None = None, chat: bool = False,
              timeout: float | None = None) -> pb.ScoreResponse:
        """log P of each token given the ones before; `chat` wraps the text in the chat template first."""
        request = pb.ScoreRequest(text=text or "", token_ids=list(token_ids), adapters=adapter_specs(adapters),
                                  mode=MODES[mode], merge=merge, chat=chat)
        return self._call(self.stub.Score, request, timeout)

    def load_adapter(self, ref: str, *, pin: bool = False, timeout: float | None = None) -> pb.LoadAdapterResponse:
        return self._call(self.stub.LoadAdapter, pb.LoadAdapterRequest(ref=ref, pin=pin), timeout)

    def unload_adapter(self, ref: str, *, timeout: float | None = None) -> pb.UnloadAdapterResponse:
        return self._call(self.stub.UnloadAdapter, pb.UnloadAdapterRequest(ref=ref), timeout)

    def list_adapters(self, *, page_size: int = 0, page_token: str = "",
                      timeout: float | None = None) -> pb.ListAdaptersResponse:
        """One page (up to 1000 adapters, in ref order); `next_page_token` asks for the next."""
        return self._call(self.stub.ListAdapters, pb.ListAdaptersRequest(page_size=page_size, page_token=page_token),
                          timeout)

    def list_all_adapters(self, *, timeout: float | None = None) -> pb.ListAdaptersResponse:
        """Every page of ListAdapters as one reply (each page's call gets `timeout`)."""
        reply = self.list_adapters(timeout=timeout)
        while reply.next_page_token:
            page = self.list_adapters(page_token=reply.next_page_token, timeout=timeout)
            reply.adapters.extend(page.adapters)
            reply.next_page_token = page.next_page_token
        return reply

    def info(self, *, timeout: float | None = None) -> pb.GetInfoResponse:
        return self._call(self.stub.GetInfo, pb.GetInfoRequest(), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", ... from the standard health service (needs no token)."""
        with _translated(self.target):
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the channel connects (grpc.FutureTimeoutError after `timeout`)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
