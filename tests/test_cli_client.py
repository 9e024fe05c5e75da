"""The client side against a real server on a localhost port: the Python client's own exception types, and
the `hub` client commands run as real subprocesses (HUB_SERVER, `-` for stdin, JSON numbers, one-line errors)."""
from __future__ import annotations

import json
import socket

import grpc
import pytest

from server_support import served_model, wait_until

from runtime.client import RuntimeClient
from runtime.client import RequestFailed, ServerUnreachable
from runtime.proto.adapterhub.v1 import runtime_pb2 as pb
from tests.test_cli_errors import assert_one_error_line, run_hub

pytestmark = pytest.mark.slow  # real servers driven by the CLI


def test_client_raises_its_own_errors_with_code_and_message(start_server):
    _, client = start_server()
    with pytest.raises(RequestFailed) as caught:
        client.generate("Hello", adapters=["nobody"])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "no adapter named 'nobody'" in caught.value.message
    assert str(caught.value) == f"NOT_FOUND: {caught.value.message} (request id {caught.value.request_id})"
    with pytest.raises(RequestFailed) as streamed:
        list(client.generate_stream("Hello", adapters=["nobody"]))
    assert streamed.value.code() == grpc.StatusCode.NOT_FOUND
    assert len({caught.value.request_id, streamed.value.request_id} - {""}) == 2  # a stream's error carries it too
    with pytest.raises(RequestFailed) as scored:
        client.score("H")
    assert scored.value.code() == grpc.StatusCode.INVALID_ARGUMENT and not isinstance(scored.value, ServerUnreachable)


def test_unreachable_server_is_its_own_error_and_one_line(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on: bound, never listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        with RuntimeClient(f"127.0.0.1:{port}", timeout=30) as client, pytest.raises(ServerUnreachable) as caught:
            client.info()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert str(caught.value) == f"cannot reach server at 127.0.0.1:{port}"
        done = run_hub("generate", "--server", f"127.0.0.1:{port}", "Hello", home=tmp_path)
    assert_one_error_line(done)
    assert done.stderr == f"error: cannot reach server at 127.0.0.1:{port}\n"


@pytest.mark.parametrize("option", ["--port", "--metrics-port"])
def test_serve_reports_a_port_in_use_before_loading_the_model(option, tmp_path):
    """The base model named does not exist: had the model loaded first, that would be the error."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--port", "0"] if option == "--metrics-port" else []
        done = run_hub("serve", *args, option, str(port), "--base-model", str(tmp_path / "no-such-model"),
                       home=tmp_path)
    assert_one_error_line(done, f"cannot listen on 127.0.0.1:{port}")


def test_hub_server_env_and_prompt_from_stdin(start_server, tmp_path):
    server, client = start_server()
    env = {"HUB_SERVER": server.address}
    done = run_hub("generate", "-", "-a", "lora1", "--max-new-tokens", "5", "--json", home=tmp_path, env=env,
                   stdin="Hello there")
    assert done.returncode == 0, done.stderr
    want = client.generate("Hello there", adapters=["lora1"], max_new_tokens=5)
    assert json.loads(done.stdout)["token_ids"] == list(want.token_ids)
    scored = run_hub("score", "-", "--json", home=tmp_path, env=env, stdin="Hello there")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["token_ids"] == list(client.score("Hello there").token_ids)


def test_adapters_json_gives_numbers_as_numbers(start_server, tmp_path):
    server, client = start_server(preload=("ia3",))
    client.generate("Hello", adapters=["ia3"], max_new_tokens=2)
    done = run_hub("adapters", "--json", "--server", server.address, home=tmp_path)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert listed["device_budget_bytes"] == server.pool.device_budget
    (ia3,) = listed["adapters"]
    assert isinstance(ia3["size_bytes"], int) and ia3["size_bytes"] > 0 and ia3["requests_served"] == 1


def test_score_shows_each_tokens_text_and_applies_the_chat_template(start_server, served_base, tmp_path):
    server, client = start_server()
    done = run_hub("score", "Hi there", "--server", server.address, home=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert [json.loads(r[2]) for r in rows[:-1]] == list("i there")  # the character tokenizer: one per char
    assert rows[-1][0] == "total"

    chat = run_hub("score", "Hi there", "--chat", "--json", "--server", server.address, home=tmp_path)
    assert chat.returncode == 0, chat.stderr
    _, tokenizer = served_model(served_base)
    wrapped = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
    reply = json.loads(chat.stdout)
    assert reply["token_ids"] == list(wrapped) and reply["tokens"] == [tokenizer.decode([i]) for i in wrapped]
    assert reply["token_ids"] != list(client.score("Hi there").token_ids)


def test_adapters_list_shows_a_merges_parents(start_server, tmp_path):
    server, _ = start_server()
    merged = run_hub("generate", "Hello", "-a", "lora0:0.5", "-a", "lora1:0.5", "--merge", "cat",
                     "--max-new-tokens", "2", "--server", server.address, home=tmp_path)
    assert merged.returncode == 0, merged.stderr
    done = run_hub("adapters", "--server", server.address, home=tmp_path)
    assert done.returncode == 0, done.stderr
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("merge:")]
    assert row.endswith("merge of lora0@1.0.0 + lora1@1.0.0"), row
    listed = json.loads(run_hub("adapters", "--json", "--server", server.address, home=tmp_path).stdout)
    parents = [a["parents"] for a in listed["adapters"] if a["ref"].startswith("merge:")]
    assert parents == [["lora0@1.0.0", "lora1@1.0.0"]]


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_serve_logs_one_line_per_request(served_base, registry, log_format, tmp_path):
    from tests.test_server_process import ServeProcess

    serve = ServeProcess("--base-model", str(served_base), "--registry", str(registry.root), "--log-format", log_format)
    try:
        with RuntimeClient(serve.address, timeout=120) as client:
            reply = client.generate("Hello", adapters=["lora1", ("ia3", 0.5)], max_new_tokens=3)
            with pytest.raises(RequestFailed) as failed:
                client.generate("Hello", adapters=["nobody"])
            scored, call = client.stub.Score.with_call(pb.ScoreRequest(text="Hi there", adapters=[
                pb.AdapterSpec(ref="lora0")]), timeout=120)
            shown = run_hub("generate", "Hello", "-a", "nobody", "--server", serve.address, home=tmp_path)
        wait_until(lambda: sum("Generate" in line for line in serve.lines) == 3, "the CLI's request line")
    finally:
        assert serve.terminate() == 0
    lines = [line for line in serve.lines if line.startswith("{" if log_format == "json" else "request ")]
    if log_format == "json":
        records = [json.loads(line) for line in lines]
    else:
        records = [dict(field.split("=", 1) for field in line.split()[1:]) for line in lines]
        for r in records:
            r["adapters"] = [] if r["adapters"] == "-" else r["adapters"].split(",")
            r.update({k: int(r[k]) for k in ("tokens_in", "tokens_out")}, latency_ms=float(r["latency_ms"]))
    assert [(r["method"], r["status"], r["adapters"], r["tokens_in"], r["tokens_out"]) for r in records] == [
        ("Generate", "OK", ["lora1@1.0.0", "ia3@1.0.0"], reply.usage.prompt_tokens, 3),
        ("Generate", "NOT_FOUND", [], 0, 0),
        ("Score", "OK", ["lora0@1.0.0"], len(scored.token_ids), 0),
        ("Generate", "NOT_FOUND", [], 0, 0),
    ]
    assert len({r["id"] for r in records}) == 4 and all(r["latency_ms"] > 0 for r in records)
    # each client learns its request's id, as the log names it: an error carries it (trailing metadata) and
    # shows it, a reply has it from the start (initial metadata)
    assert failed.value.request_id == records[1]["id"] and f"(request id {records[1]['id']})" in str(failed.value)
    assert ("x-request-id", records[2]["id"]) in call.initial_metadata()
    assert_one_error_line(shown, "NOT_FOUND", f"(request id {records[3]['id']})")
