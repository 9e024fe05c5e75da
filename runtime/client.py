"""A Python client for the runtime: one method per RPC, with plain arguments instead of messages.

    from runtime.client import RuntimeClient
    with RuntimeClient("127.0.0.1:50051") as client:
        reply = client.generate("Hello", adapters=["support-bot@prod", ("sql", 0.5)], max_new_tokens=32)
        print(reply.text, reply.finish_reason, [a.ref for a in reply.adapters])

Errors come back as `grpc.RpcError` with the server's status code and message.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Union

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.proto.adapterhub.v1 import runtime_pb2 as pb
from runtime.proto.adapterhub.v1 import runtime_pb2_grpc as pb_grpc

AdapterArg = Union[str, tuple[str, float], pb.AdapterSpec]
MODES = {"stack": pb.COMPOSITION_MODE_STACK, "average": pb.COMPOSITION_MODE_AVERAGE, "merge": pb.COMPOSITION_MODE_MERGE}


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
        options = [("grpc.max_receive_message_length", max_message_bytes),
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

    def __enter__(self) -> RuntimeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _kw(self, timeout: float | None) -> dict:
        return {"metadata": self._metadata, "timeout": timeout if timeout is not None else self.timeout}

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
        return self.stub.Generate(self.generate_request(prompt, **kwargs), **self._kw(timeout))

    def generate_stream(self, prompt: str | None = None, *, timeout: float | None = None,
                        **kwargs) -> Iterator[pb.GenerateChunk]:
        """Chunks as they are generated; the returned call also has `.cancel()`."""
        return self.stub.GenerateStream(self.generate_request(prompt, **kwargs), **self._kw(timeout))

    def score(self, text: str | None = None, *, token_ids: Iterable[int] = (), adapters: Iterable[AdapterArg] = (),
              mode: str = "stack", merge: pb.MergeOptions | None = None,
              timeout: float | None = None) -> pb.ScoreResponse:
        request = pb.ScoreRequest(text=text or "", token_ids=list(token_ids), adapters=adapter_specs(adapters),
                                  mode=MODES[mode], merge=merge)
        return self.stub.Score(request, **self._kw(timeout))

    def load_adapter(self, ref: str, *, pin: bool = False, timeout: float | None = None) -> pb.LoadAdapterResponse:
        return self.stub.LoadAdapter(pb.LoadAdapterRequest(ref=ref, pin=pin), **self._kw(timeout))

    def unload_adapter(self, ref: str, *, timeout: float | None = None) -> pb.UnloadAdapterResponse:
        return self.stub.UnloadAdapter(pb.UnloadAdapterRequest(ref=ref), **self._kw(timeout))

    def list_adapters(self, *, page_size: int = 0, page_token: str = "",
                      timeout: float | None = None) -> pb.ListAdaptersResponse:
        """One page (up to 1000 adapters, in ref order); `next_page_token` asks for the next."""
        return self.stub.ListAdapters(pb.ListAdaptersRequest(page_size=page_size, page_token=page_token),
                                      **self._kw(timeout))

    def list_all_adapters(self, *, timeout: float | None = None) -> pb.ListAdaptersResponse:
        """Every page of ListAdapters as one reply (each page's call gets `timeout`)."""
        reply = self.list_adapters(timeout=timeout)
        while reply.next_page_token:
            page = self.list_adapters(page_token=reply.next_page_token, timeout=timeout)
            reply.adapters.extend(page.adapters)
            reply.next_page_token = page.next_page_token
        return reply

    def info(self, *, timeout: float | None = None) -> pb.GetInfoResponse:
        return self.stub.GetInfo(pb.GetInfoRequest(), **self._kw(timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", ... from the standard health service (needs no token)."""
        reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the channel connects (grpc.FutureTimeoutError after `timeout`)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
