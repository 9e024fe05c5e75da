"""The `hub` registry commands end to end: every technique goes push -> list -> pull -> export bit for bit,
exports load in PEFT, and every failure is one line, a non-zero exit, and an unchanged registry."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hub.cli import app
from helpers import tiny_llama
from tests.test_registry import TECHNIQUES, snapshot

runner = CliRunner()


def hub(*args: str, home: Path, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args], env={"HUB_HOME": str(home)})
    if ok:
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def one_line_error(result, message: str) -> None:
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_push_list_pull_export_round_trip(technique, technique_adapters, tmp_path):
    src, base = technique_adapters[technique], technique_adapters["base"]
    alice, bob, shared = tmp_path / "alice", tmp_path / "bob", tmp_path / "shared"
    name = f"team/{technique}"

    hub("remote", "add", "origin", shared, home=alice)
    out = hub("push", src, "--name", name, "--version", "1.2.0", "--base-model", base, "--to", "origin",
              "--description", "round trip", "--tags", "demo,test", home=alice).stdout
    assert f"pushed {name}@1.2.0 {technique}" in out and f"to {shared.resolve()}" in out

    listed = json.loads(hub("list", "--json", "--registry", shared, home=alice).stdout)
    assert [(m["name"], m["version"], m["technique"]) for m in listed] == [(name, "1.2.0", technique)]
    assert listed[0]["base_model"]["fingerprint"] and listed[0]["tags"] == ["demo", "test"]
    table = hub("list", "--technique", technique, home=alice).stdout
    assert f"{name}@1.2.0" in table and technique in table

    assert f"pulled {name}@1.2.0" in hub("pull", f"{name}@1.2.0", "--from", f"file://{shared}", home=bob).stdout
    assert "tagged" not in hub("pull", f"{name}@1.2.0", "--from", shared, home=bob).stdout  # a version: no tag
    shown = json.loads(hub("show", name, "--json", home=bob).stdout)
    assert shown["sha256"] == listed[0]["sha256"] and shown["description"] == "round trip"
    assert hub("verify", home=bob).stdout.startswith("ok: ")

    exported = Path(hub("export", f"{name}@1.2.0", "--out", tmp_path / "exported", home=bob).stdout.strip())
    assert sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in src.iterdir())
    for p in src.iterdir():
        assert (exported / p.name).read_bytes() == p.read_bytes()
    original, back = load_file(src / "adapter_model.safetensors"), load_file(exported / "adapter_model.safetensors")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)


@pytest.mark.parametrize("technique", ["lora", "ia3", "prompt_tuning"])
def test_export_loads_in_peft_with_the_original_outputs(technique, technique_adapters, tmp_path):
    from peft import PeftModel

    home = tmp_path / "home"
    hub("push", technique_adapters[technique], "--name", technique, "--version", "1.0.0", home=home)
    exported = tmp_path / "exported"
    hub("export", technique, "--out", exported, home=home)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(tiny_llama(), technique_adapters[technique])(input_ids=ids).logits
        got = PeftModel.from_pretrained(tiny_llama(), exported)(input_ids=ids).logits
        plain = tiny_llama()(input_ids=ids).logits
    assert torch.equal(got, want)
    assert not torch.allclose(got[:, -1], plain[:, -1])  # the adapter really changes the output


def test_tag_show_rm_gc(technique_adapters, tmp_path):
    home = tmp_path / "home"
    hub("push", technique_adapters["ia3"], "--name", "ia3", "--version", "1.0.0", home=home)
    hub("push", technique_adapters["lora"], "--name", "ia3", "--version", "1.1.0", home=home)
    assert hub("tag", "ia3@1.0.0", "stable", home=home).stdout.strip() == "ia3@stable -> 1.0.0"
    shown = hub("show", "ia3@stable", home=home).stdout
    assert "version: 1.0.0" in shown and 'ref_tags: ["stable"]' in shown
    assert "version: 1.1.0" in hub("show", "ia3", home=home).stdout
    assert "stable" in hub("list", home=home).stdout
    assert hub("rm", "ia3@1.1.0", home=home).stdout.strip() == "removed ia3@1.1.0"
    assert hub("gc", home=home).stdout.startswith("removed 3 blobs")
    assert hub("verify", "ia3", home=home).stdout.strip() == "ok: 3 files verified"


def test_pull_by_tag_sets_the_local_tag(technique_adapters, tmp_path):
    """`hub pull name@stable` leaves `name@stable` resolving here to the version it pulled, and a
    later pull after the remote moved the tag moves the local one too."""
    alice, bob, shared = tmp_path / "alice", tmp_path / "bob", tmp_path / "shared"
    for version in ("1.0.0", "1.1.0"):
        hub("push", technique_adapters["ia3"], "--name", "ia3", "--version", version, "--to", shared, home=alice)
    hub("tag", "ia3@1.0.0", "stable", "--registry", shared, home=alice)
    out = hub("pull", "ia3@stable", "--from", shared, home=bob).stdout
    assert "pulled ia3@1.0.0" in out and "tagged ia3@stable -> 1.0.0" in out
    assert "version: 1.0.0" in hub("show", "ia3@stable", home=bob).stdout
    hub("tag", "ia3@1.1.0", "stable", "--registry", shared, home=alice)
    assert "tagged ia3@stable -> 1.1.0" in hub("pull", "ia3@stable", "--from", shared, home=bob).stdout
    assert "version: 1.1.0" in hub("show", "ia3@stable", home=bob).stdout


def test_pull_without_from_uses_the_only_remote_else_origin(technique_adapters, tmp_path):
    """Without --from, `hub pull` takes the one configured remote, or `origin` among several; with several and
    no origin it asks for --from in one line and changes nothing."""
    alice, bob, team, shared = tmp_path / "alice", tmp_path / "bob", tmp_path / "team", tmp_path / "shared"
    hub("push", technique_adapters["ia3"], "--name", "ia3", "--version", "1.0.0", "--to", team, home=alice)
    hub("push", technique_adapters["ia3"], "--name", "ia3", "--version", "2.0.0", "--to", shared, home=alice)
    hub("remote", "add", "a-team", team, home=bob)  # sorts and was added before origin
    assert "pulled ia3@1.0.0" in hub("pull", "ia3", home=bob).stdout
    hub("remote", "add", "origin", shared, home=bob)
    assert "pulled ia3@2.0.0" in hub("pull", "ia3", home=bob).stdout
    hub("remote", "rm", "origin", home=bob)
    hub("remote", "add", "b-team", shared, home=bob)
    before = snapshot(bob)
    one_line_error(hub("pull", "ia3", home=bob, ok=False), "name a remote with --from (configured: a-team, b-team)")
    assert snapshot(bob) == before


def test_remote_add_list_rm(tmp_path):
    home = tmp_path / "home"
    hub("remote", "add", "shared", tmp_path / "shared", home=home)
    hub("remote", "add", "hf", "hf://acme/adapters", home=home)
    assert hub("remote", "list", home=home).stdout.splitlines() == [
        "hf\thf://acme/adapters", f"shared\t{(tmp_path / 'shared').resolve()}"]
    one_line_error(hub("remote", "add", "shared", tmp_path, home=home, ok=False), "already exists")
    one_line_error(hub("remote", "add", "s3", "s3://bucket/x", home=home, ok=False), "unsupported remote")
    one_line_error(hub("remote", "add", "bad", "hf://../x", home=home, ok=False), "invalid Hugging Face repo")
    hub("remote", "rm", "hf", home=home)
    one_line_error(hub("remote", "rm", "hf", home=home, ok=False), "no remote named 'hf'")
    assert hub("remote", "list", home=home).stdout.splitlines() == [f"shared\t{(tmp_path / 'shared').resolve()}"]


def _tampered_remote(technique_adapters, tmp_path) -> Path:
    shared = tmp_path / "shared"
    hub("push", technique_adapters["lora"], "--name", "lora", "--version", "1.0.0", "--registry", shared,
        home=tmp_path / "unused")
    blob = next(p for p in (shared / "blobs").rglob("*") if p.is_file() and p.stat().st_size == 8192)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    return shared


def test_tampered_remote_blob_fails_verify_and_pull_refuses(technique_adapters, tmp_path):
    shared = _tampered_remote(technique_adapters, tmp_path)
    result = hub("verify", "--registry", shared, home=tmp_path / "unused", ok=False)
    assert result.exit_code == 1 and "lora@1.0.0: adapter_model.safetensors does not match its sha256" in result.stderr
    home = tmp_path / "home"
    hub("push", technique_adapters["ia3"], "--name", "ia3", "--version", "1.0.0", home=home)
    before = snapshot(home)
    one_line_error(hub("pull", "lora@1.0.0", "--from", shared, home=home, ok=False), "tampered or corrupted")
    assert snapshot(home) == before


def _truncated(technique_adapters, tmp_path) -> Path:
    folder = tmp_path / "truncated"
    shutil.copytree(technique_adapters["lora"], folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return folder


def _unknown(technique_adapters, tmp_path) -> Path:
    folder = tmp_path / "unknown"
    shutil.copytree(technique_adapters["bitfit"], folder)
    (folder / "adapter_config.json").write_text('{"adapter_type": "compacter"}')
    return folder


@pytest.mark.parametrize("args, message", [
    (lambda a, t: ["push", a["lora"], "--name", "../escape", "--version", "1.0.0"], "invalid adapter name"),
    (lambda a, t: ["push", a["lora"], "--name", "ok", "--version", "1"], "invalid version"),
    (lambda a, t: ["push", a["ia3"], "--name", "keep", "--version", "1.0.0"], "immutable"),
    (lambda a, t: ["push", _truncated(a, t), "--name", "t", "--version", "1.0.0"], "not a valid safetensors file"),
    (lambda a, t: ["push", _unknown(a, t), "--name", "u", "--version", "1.0.0"], "unknown adapter config"),
    (lambda a, t: ["push", t / "missing", "--name", "m", "--version", "1.0.0"], "not a folder"),
    (lambda a, t: ["push", a["lora"], "--name", "x", "--version", "1.0.0", "--base-model", t / "small"],
     "does not fit base model"),
    (lambda a, t: ["push", a["ia3"], "--name", "new", "--version", "1.0.0", "--to", "hf://acme/new"], "push failed"),
    (lambda a, t: ["push", a["ia3"], "--name", "new", "--version", "1.0.0", "--to", t / "occupied" / "mine.txt"],
     "mine.txt is not a folder"),
    (lambda a, t: ["pull", "keep@1.0.0"], "name a remote with --from"),
    (lambda a, t: ["pull", "nope@1.0.0", "--from", t / "nowhere"], "is not a registry"),
    (lambda a, t: ["pull", "keep", "--from", "s3://bucket"], "unsupported remote"),
    (lambda a, t: ["list", "--technique", "LoRA"], "unknown technique 'LoRA'; one of: lora, ia3"),
    (lambda a, t: ["show", "nope"], "no adapter named 'nope'"),
    (lambda a, t: ["show", "keep@9.9.9"], "has no version 9.9.9"),
    (lambda a, t: ["tag", "keep@1.0.0", "9bad"], "invalid tag"),
    (lambda a, t: ["rm", "keep"], "give the version to remove"),
    (lambda a, t: ["export", "keep", "--out", t / "occupied"], "not an empty folder"),
    (lambda a, t: ["list", "--registry", t / "nowhere"], "no registry folder"),
])
def test_every_failure_is_one_line_and_leaves_the_registry_as_it_was(args, message, technique_adapters, tmp_path):
    home = tmp_path / "home"
    hub("push", technique_adapters["lora"], "--name", "keep", "--version", "1.0.0", home=home)
    tiny_llama(hidden_size=32, num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path / "small")
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "mine.txt").write_text("mine")
    before = snapshot(home)
    one_line_error(hub(*args(technique_adapters, tmp_path), home=home, ok=False), message)
    assert snapshot(home) == before


def test_the_hub_command_starts_without_torch():
    """Registry commands start in a fraction of a second: importing the CLI must not import torch
    (merge math, engine and training load it when a command needs them)."""
    import subprocess
    import sys

    code = "import sys, hub.cli; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
