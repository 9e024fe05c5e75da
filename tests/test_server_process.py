"""`hub serve` as a process: SIGTERM finishes in-flight work and exits 0; the real default base model serves
two adapters that answer differently; the client commands talk to it."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request

import grpc
import pytest
import torch


from runtime.client import RuntimeClient

pytestmark = pytest.mark.slow  # `hub serve` processes

HUB = [sys.executable, "-m", "hub"]


class ServeProcess:
    """`hub serve ... --port 0` in a subprocess; the port is read from its 'listening on' line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([*HUB, "serve", "--port", "0", *args], stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"listening on (\S+)", line)
            if found:
                self.address = found.group(1)
                break
        else:
            raise AssertionError(f"hub serve exited ({self.proc.wait()}) before listening:\n{''.join(self.lines)}")
        self._rest = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._rest.start()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=120)
        self.drain()
        return code

    def drain(self) -> None:
        """Once the process has exited: wait until `lines` holds all it wrote."""
        self._rest.join(timeout=10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_sigterm_finishes_in_flight_requests_then_exits_0(served_base, registry):
    serve = ServeProcess("--base-model", str(served_base), "--registry", str(registry.root), "--grace", "300")
    try:
        client = RuntimeClient(serve.address, timeout=300)
        stream = client.generate_stream("Tell me a story", adapters=["lora0"], max_new_tokens=400)  # no EOS in 400
        head = [next(stream), next(stream)]
        serve.proc.send_signal(signal.SIGTERM)  # while the stream runs
        chunks = head + list(stream)  # the in-flight request runs to its end
        assert chunks[-1].finish_reason == "length"
        assert sum(len(c.token_ids) for c in chunks) == 400
        assert serve.proc.wait(timeout=300) == 0
        client.close()
        log = "".join(serve.lines)
        assert re.search(r"stopping: 1 running and 0 queued", log), log  # it was in flight when the stop began
        assert "Traceback" not in log
        with RuntimeClient(serve.address, timeout=5) as late:
            with pytest.raises(grpc.RpcError):
                late.info()
    finally:
        serve.kill()


def _hub(*args: str):
    """`hub ARGS` in-process (CliRunner): the same typer app, without a new interpreter per command."""
    from typer.testing import CliRunner

    from hub.cli import app

    return CliRunner().invoke(app, list(args))


def test_client_commands(start_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-admin\n")
    server, _ = start_server(auth_token_file=tokens, preload=("ia3", "bitfit"))
    auth = ["--server", server.address, "--token-file", str(tokens)]
    listed = _hub("adapters", *auth)
    assert listed.exit_code == 0, listed.output
    assert "ia3@1.0.0" in listed.output and "pinned" in listed.output
    assert listed.output.count("last used never") == 2  # preloaded, no request yet
    assert _hub("adapters", "list", "--json", *auth).output.count('"pinned": true') == 2
    loaded = _hub("adapters", "load", "lora1", *auth)
    assert loaded.exit_code == 0 and "loaded lora1@1.0.0" in loaded.output
    out = _hub("generate", "Hello", "-a", "lora1", "-a", "ia3:0.5", "--max-new-tokens", "5", "--json", *auth)
    assert out.exit_code == 0, out.output
    reply = json.loads(out.output)
    assert [a["ref"] for a in reply["adapters"]] == ["lora1@1.0.0", "ia3@1.0.0"] and reply["adapters"][1]["weight"] == 0.5
    assert reply["finish_reason"] == "length" and len(reply["token_ids"]) == 5
    streamed = _hub("generate", "Hello", "-a", "lora1", "--max-new-tokens", "5", "--stream", *auth)
    plain = _hub("generate", "Hello", "-a", "lora1", "--max-new-tokens", "5", *auth)
    assert streamed.exit_code == plain.exit_code == 0 and streamed.output == plain.output
    scored = _hub("score", "Hello", "-a", "lora1", *auth)
    assert scored.exit_code == 0 and scored.output.splitlines()[-1].startswith("total\t-")
    assert len(scored.output.splitlines()) == len("Hello")  # one line per scored token + the total
    used = next(line for line in _hub("adapters", *auth).output.splitlines() if line.startswith("lora1@1.0.0"))
    assert re.search(r"in use 0 +served 4 +last used \d+ s ago", used), used  # generate x3 and score
    unloaded = _hub("adapters", "unload", "lora1", *auth)
    assert unloaded.exit_code == 0 and "unloaded lora1@1.0.0" in unloaded.output
    refused = _hub("generate", "Hello", "-a", "nobody", *auth)
    assert refused.exit_code == 1 and "error: NOT_FOUND: no adapter named 'nobody'" in refused.output
    anonymous = _hub("generate", "Hello", "--server", server.address)
    assert anonymous.exit_code == 1 and "error: UNAUTHENTICATED" in anonymous.output
    bad_weight = _hub("generate", "Hello", "-a", "lora1:heavy", *auth)
    assert bad_weight.exit_code != 0 and "must be a finite number" in bad_weight.output


def test_serve_refuses_bad_options_with_one_line(served_base, registry):
    for args, message in (
        (["--tls-cert", "/nonexistent.pem"], "TLS needs both --tls-cert and --tls-key"),
        (["--preload", "nobody"], "NOT_FOUND: no adapter named 'nobody'"),
        (["--adapter-memory", "lots"], "is not a size"),
        (["--dtype", "int3"], "--dtype must be"),
        (["--device", "bogus"], "--device 'bogus' cannot be used here"),
        *([(["--device", "cuda"], "--device 'cuda' cannot be used here")] if not torch.cuda.is_available() else []),
        # out of range: refused by the CLI itself, as a usage error (exit 2)
        (["--port", "99999"], "'--port': Input should be less than or equal to 65535"),
        (["--metrics-port", "70000"], "'--metrics-port': Input should be less than or equal to 65535"),
        (["--grace", "-1"], "'--grace': Input should be greater than or equal to 0"),
        (["--adapter-wait", "-2"], "'--adapter-wait': Input should be greater than or equal to 0"),
        (["--max-batch-size", "0"], "'--max-batch-size': Input should be greater than or equal to 1"),
    ):
        result = _hub("serve", "--port", "0", "--base-model", str(served_base), "--registry", str(registry.root), *args)
        last = result.output.strip().splitlines()[-1]  # (transformers may print a loading bar before)
        code = 2 if "Input should be" in message else 1
        assert result.exit_code == code and last.startswith("error: ") and message in last, result.output


@pytest.mark.slow
def test_default_base_model_serves_two_adapters_that_answer_differently(tmp_path, real_hub_home, monkeypatch):
    """The real SmolLM2-135M behind `hub serve`: two LoRAs, same prompt, different answers; no adapter = the base."""
    from peft import LoraConfig

    from helpers import save_peft_adapter
    from hub import basemodel
    from hub.registry import Registry

    monkeypatch.setenv("HUB_HOME", real_hub_home)  # where `make test` prepared the default base model
    model, tokenizer = basemodel.load()
    registry = Registry(tmp_path / "registry")
    for seed in (1, 2):
        folder = save_peft_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                                   tmp_path / f"lora{seed}", seed=seed)
        registry.push(folder, f"demo{seed}", "1.0.0", base_model=basemodel.DEFAULT_BASE_MODEL)
    expected_base = basemodel.chat_reply(model, tokenizer, "What is the capital of France?", max_new_tokens=12)
    del model
    serve = ServeProcess("--registry", str(registry.root))
    try:
        with RuntimeClient(serve.address, timeout=300) as client:
            info = client.info()
            assert info.base_model == "smollm2-135m" and info.base_model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
            answers = [client.generate("What is the capital of France?", chat=True, adapters=adapters, max_new_tokens=12)
                       for adapters in ([], ["demo1"], ["demo2"])]
        assert answers[0].text.strip() == expected_base
        assert len({a.text for a in answers}) == 3
        assert [a.adapters[0].ref for a in answers[1:]] == ["demo1@1.0.0", "demo2@1.0.0"]
        assert serve.terminate() == 0
    finally:
        serve.kill()


@pytest.mark.parametrize("seconds,shown", [(0.4, "0 s ago"), (59, "59 s ago"), (60, "1 min ago"), (3599, "59 min ago"),
                                           (7200, "2 h ago"), (3 * 86400 + 5, "3 d ago")])
def test_adapters_listing_shows_last_use_in_the_largest_whole_unit(seconds, shown):
    from runtime.cli import _ago

    assert _ago(1_000_000.0, 1_000_000.0 + seconds) == shown
    assert _ago(0.0, 1_000_000.0) == "never"


def test_metrics_host_flag(served_base, registry):
    """`--metrics-host` is where /metrics binds (default 127.0.0.1 whatever --host is); the start line says so."""
    serve = ServeProcess("--base-model", str(served_base), "--registry", str(registry.root), "--host", "0.0.0.0",
                         "--metrics-port", "0", "--metrics-host", "localhost")
    try:
        found = re.search(r"metrics on http://localhost:(\d+)/metrics", "".join(serve.lines))
        assert found, serve.lines
        assert b"adapterhub_requests_total" in urllib.request.urlopen(f"http://localhost:{found[1]}/metrics").read()
        assert serve.terminate() == 0
    finally:
        serve.kill()


def test_adapters_command_lists_every_page(start_server, monkeypatch):
    import runtime.service

    monkeypatch.setattr(runtime.service, "MAX_PAGE_SIZE", 2)  # ListAdapters pages of 2
    server, client = start_server(preload=("lora0", "lora1", "ia3", "bitfit", "bottleneck"))
    assert len(client.list_adapters().adapters) == 2
    listed = _hub("adapters", "--server", server.address)
    assert listed.exit_code == 0, listed.output
    assert [line.split()[0] for line in listed.output.splitlines()[1:]] == [
        "bitfit@1.0.0", "bottleneck@1.0.0", "ia3@1.0.0", "lora0@1.0.0", "lora1@1.0.0"]
    as_json = json.loads(_hub("adapters", "--json", "--server", server.address).output)
    assert len(as_json["adapters"]) == 5 and "next_page_token" not in as_json
