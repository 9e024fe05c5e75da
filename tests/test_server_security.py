"""Tokens, TLS, message-size limits and the default bind address."""
from __future__ import annotations

import subprocess

import grpc
import pytest


from runtime.auth import AuthConfigError, read_token_file
from runtime.client import RuntimeClient
from runtime.server import ServerConfig, ServerConfigError

CODE = grpc.StatusCode
ADMIN, USER = "s3cret-admin-token", "plain-user-token"


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# who may call\n{ADMIN}\n{USER} user\n")
    return path


def _code(call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value.code(), caught.value.details()


def test_every_rpc_needs_a_known_token(start_server, token_file):
    server, admin = start_server(token=ADMIN, auth_token_file=token_file)
    anonymous = RuntimeClient(server.address)
    wrong = RuntimeClient(server.address, token="guess")
    user = RuntimeClient(server.address, token=USER)
    try:
        for client in (anonymous, wrong):
            for call, args in ((client.generate, ("hi",)), (client.score, ("hi",)), (client.list_adapters, ()),
                               (client.info, ()), (client.load_adapter, ("lora0",)), (client.unload_adapter, ("lora0",))):
                code, details = _code(call, *args)
                assert code == CODE.UNAUTHENTICATED and "Bearer" in details
            with pytest.raises(grpc.RpcError) as caught:
                list(client.generate_stream("hi", max_new_tokens=2))
            assert caught.value.code() == CODE.UNAUTHENTICATED
        assert anonymous.health() == "SERVING"  # probes need no token
        assert user.generate("hi", max_new_tokens=2).token_ids
        assert _code(user.load_adapter, "lora0") == (CODE.PERMISSION_DENIED,
                                                     "/adapterhub.v1.Runtime/LoadAdapter needs an admin token")
        assert _code(user.unload_adapter, "lora0")[0] == CODE.PERMISSION_DENIED
        assert admin.load_adapter("lora0", pin=True).adapter.pinned
        assert admin.unload_adapter("lora0").adapter.ref == "lora0@1.0.0"
    finally:
        for client in (anonymous, wrong, user):
            client.close()


def test_admin_only_flag_leaves_inference_open(start_server, token_file):
    server, _ = start_server(auth_token_file=token_file, auth_admin_only=True)
    with RuntimeClient(server.address) as anonymous:
        assert anonymous.generate("hi", max_new_tokens=2).token_ids
        assert anonymous.info().base_model
        assert _code(anonymous.load_adapter, "lora0")[0] == CODE.UNAUTHENTICATED
    with RuntimeClient(server.address, token=ADMIN) as admin:
        assert admin.load_adapter("lora0").adapter.ref == "lora0@1.0.0"


@pytest.mark.parametrize("content,message", [("", "holds no token"), ("tok superuser\n", "expected `TOKEN"),
                                             ("a b c\n", "expected `TOKEN")])
def test_bad_token_files_are_refused(tmp_path, content, message):
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(AuthConfigError, match=message):
        read_token_file(path)
    with pytest.raises(AuthConfigError, match="cannot read token file"):
        read_token_file(tmp_path / "missing")


def test_server_refuses_to_start_with_a_bad_token_file(start_server, tmp_path):
    with pytest.raises(ServerConfigError, match="cannot read token file"):
        start_server(auth_token_file=tmp_path / "missing")


def _self_signed(folder):
    """A self-signed certificate for localhost (openssl CLI: the `cryptography` package is not installed)."""
    key, cert = folder / "server.key", folder / "server.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def test_tls(start_server, tmp_path, token_file):
    cert, key = _self_signed(tmp_path)
    server, client = start_server(tls_cert=cert, tls_key=key, tls_ca=cert, token=ADMIN, auth_token_file=token_file)
    assert client.generate("hi", max_new_tokens=2).token_ids
    with RuntimeClient(server.address, token=ADMIN, timeout=5) as plaintext:
        code, _ = _code(plaintext.info)
        assert code == CODE.UNAVAILABLE  # a plaintext client cannot talk to a TLS port


def test_tls_needs_both_files(start_server, tmp_path):
    cert, _ = _self_signed(tmp_path)
    with pytest.raises(ServerConfigError, match="both --tls-cert and --tls-key"):
        start_server(tls_cert=cert)


def test_message_size_limit(start_server):
    server, client = start_server(max_message_bytes=64 * 1024)
    code, _ = _code(client.generate, "x" * 100_000, max_new_tokens=2)
    assert code == CODE.RESOURCE_EXHAUSTED
    assert client.generate("x" * 100, max_new_tokens=2).token_ids


def test_binds_loopback_by_default(start_server):
    assert ServerConfig().host == "127.0.0.1"
    server, _ = start_server()
    assert server.address.startswith("127.0.0.1:")


def test_port_in_use_is_a_clear_error(start_server):
    server, _ = start_server()
    with pytest.raises(ServerConfigError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        start_server(port=server.port)
