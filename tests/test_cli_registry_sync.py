"""Registry commands between a local registry and its remotes: remote names, tags travelling both ways,
publishing versions already in the registry, re-pushes, and repairing damaged blobs from a remote."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from hub.registry import Registry
from tests.test_cli_registry import hub, one_line_error
from tests.test_registry import snapshot


def test_unknown_remote_name_is_not_taken_as_a_path(technique_adapters, tmp_path, monkeypatch):
    """A mistyped remote name fails naming the known remotes; it neither creates a folder of that name
    (push) nor reports a missing registry there (pull). Paths still work."""
    home = tmp_path / "home"
    hub("remote", "add", "shared", tmp_path / "shared", home=home)
    hub("remote", "add", "backup", tmp_path / "backup", home=home)
    monkeypatch.chdir(tmp_path)
    before = snapshot(home)
    push = ("push", technique_adapters["ia3"], "--name", "x", "--version", "1.0.0")
    one_line_error(hub(*push, "--to", "shraed", home=home, ok=False),
                   "no remote named 'shraed'; known remotes: backup, shared")
    one_line_error(hub("pull", "x", "--from", "shraed", home=home, ok=False), "no remote named 'shraed'")
    assert snapshot(home) == before and not (tmp_path / "shraed").exists()
    assert f"to {(tmp_path / 'plain').resolve()}" in hub(*push, "--to", "./plain", home=home).stdout
    assert "pulled x@1.0.0" in hub("pull", "x", "--from", "plain", home=tmp_path / "other").stdout  # exists


def test_repush_says_unchanged_or_refuses_other_metadata(technique_adapters, tmp_path):
    home = tmp_path / "home"
    push = ("push", technique_adapters["lora"], "--name", "x", "--version", "1.0.0", "--description", "first")
    assert hub(*push, home=home).stdout.startswith("pushed x@1.0.0 lora")
    before = snapshot(home)
    assert hub(*push, home=home).stdout.startswith("unchanged x@1.0.0 lora")
    one_line_error(hub(*push[:-1], "other", home=home, ok=False),
                   "x@1.0.0 already exists with the same files but a different description; versions are immutable")
    one_line_error(hub(*push, "--license", "mit", "--tags", "demo", home=home, ok=False), "different tags, license")
    assert snapshot(home) == before
    assert "description: first" in hub("show", "x", home=home).stdout


def test_tags_travel_with_push_and_pull_and_can_be_deleted_alone(technique_adapters, tmp_path):
    alice, bob, shared = tmp_path / "alice", tmp_path / "bob", tmp_path / "shared"
    hub("remote", "add", "shared", shared, home=alice)
    hub("push", technique_adapters["ia3"], "--name", "ia3", "--version", "1.0.0", home=alice)
    hub("tag", "ia3@1.0.0", "stable", home=alice)
    hub("tag", "ia3@1.0.0", "prod", home=alice)
    hub("push", technique_adapters["lora"], "--name", "ia3", "--version", "1.1.0", home=alice)
    hub("tag", "ia3@1.1.0", "stable", home=alice)  # moves stable
    hub("push", "ia3@1.0.0", "--to", "shared", home=alice)
    hub("push", "ia3@1.1.0", "--to", "shared", home=alice)
    assert "ref_tags: [\"prod\"]" in hub("show", "ia3@1.0.0", "--registry", shared, home=alice).stdout
    out = hub("pull", "ia3@stable", "--from", shared, home=bob).stdout
    assert "pulled ia3@1.1.0" in out and "tagged ia3@stable -> 1.1.0" in out

    assert hub("untag", "ia3@prod", home=alice).stdout.strip() == "deleted tag ia3@prod (was 1.0.0)"
    assert "ia3@1.0.0" in hub("list", home=alice).stdout
    one_line_error(hub("untag", "ia3@prod", home=alice, ok=False), "ia3 has no tag 'prod'")
    one_line_error(hub("untag", "ia3@1.0.0", home=alice, ok=False), "give the tag to delete")
    before = snapshot(alice)
    one_line_error(hub("rm", "ia3@stable", home=alice, ok=False),
                   "give the version to remove: `hub rm ia3@1.1.0` removes it (and its tags: stable); "
                   "`hub untag ia3@stable` deletes the tag alone")
    assert snapshot(alice) == before
    assert hub("rm", "ia3@1.1.0", home=alice).stdout.strip() == "removed ia3@1.1.0 and its tags: stable"


def test_a_registry_version_without_a_folder_is_published(technique_adapters, tmp_path):
    """A merge result exists only in the registry; `hub push REF --to REMOTE` publishes it as it is."""
    home, shared = tmp_path / "home", tmp_path / "shared"
    hub("remote", "add", "shared", shared, home=home)
    for name in ("a", "b"):
        hub("push", technique_adapters["lora"], "--name", f"me/{name}", "--version", "1.0.0", home=home)
    hub("merge", "me/a", "me/b", "--method", "ties", "--density", "0.5", "--name", "me/m-ties", "--version", "1.0.0",
        home=home)
    assert hub("push", "me/m-ties@1.0.0", "--to", "shared", home=home).stdout.strip() == \
        f"pushed me/m-ties@1.0.0 to {shared.resolve()}"
    local = hub("show", "me/m-ties", "--json", home=home).stdout
    assert hub("show", "me/m-ties@1.0.0", "--json", "--registry", shared, home=home).stdout == local
    assert hub("verify", "--registry", shared, home=home).stdout.startswith("ok: ")
    before = snapshot(home)
    one_line_error(hub("push", "me/m-ties@1.0.0", home=home, ok=False), "give --to REMOTE")
    one_line_error(hub("push", "me/m-ties@1.0.0", "--to", "shared", "--description", "x", home=home, ok=False),
                   "apply to folders")
    one_line_error(hub("push", technique_adapters["lora"], "--to", "shared", home=home, ok=False),
                   "give --name and --version")
    one_line_error(hub("push", "me/nope@1.0.0", "--to", "shared", home=home, ok=False), "no adapter named 'me/nope'")
    assert snapshot(home) == before


def _damage(home: Path, ref: str) -> None:
    """Flip one byte of the version's weights blob."""
    reg = Registry(home)
    blob = reg.store.path(reg.resolve(ref).files["adapter_model.safetensors"]["sha256"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))


def test_pull_and_verify_repair_replace_damaged_blobs(technique_adapters, tmp_path):
    home, shared = tmp_path / "home", tmp_path / "shared"
    hub("remote", "add", "shared", shared, home=home)
    hub("push", technique_adapters["lora"], "--name", "x", "--version", "1.0.0", "--to", "shared", home=home)
    hub("push", technique_adapters["ia3"], "--name", "y", "--version", "1.0.0", "--to", "shared", home=home)
    hub("push", technique_adapters["bitfit"], "--name", "z", "--version", "1.0.0", home=home)  # local only

    _damage(home, "x@1.0.0")
    assert "x@1.0.0: adapter_model.safetensors does not match" in hub("verify", home=home, ok=False).stderr
    out = hub("pull", "x@1.0.0", "--from", "shared", home=home).stdout
    assert "pulled x@1.0.0" in out and f"repaired x@1.0.0 from {shared.resolve()} (1 file)" in out
    assert hub("verify", home=home).stdout.startswith("ok: ")
    assert "repaired" not in hub("pull", "x@1.0.0", "--from", "shared", home=home).stdout  # nothing was damaged

    for ref in ("x@1.0.0", "y@1.0.0", "z@1.0.0"):
        _damage(home, ref)
    result = hub("verify", "--repair", "--from", "shared", home=home, ok=False)
    assert result.exit_code == 1
    assert "repaired x@1.0.0 from" in result.stdout and "repaired y@1.0.0 from" in result.stdout
    assert result.stderr.count("\n") == 1 and "error: z@1.0.0: adapter_model.safetensors does not match" in \
        result.stderr and "not repaired from" in result.stderr and "no adapter named 'z'" in result.stderr
    assert hub("verify", "x", home=home).stdout.startswith("ok: ") and hub("verify", "y", home=home)
    hub("rm", "z@1.0.0", home=home)
    assert hub("verify", "--repair", home=home).stdout.startswith("ok: ")


def test_escape_sequences_from_a_remote_manifest_never_reach_the_terminal(technique_adapters, tmp_path):
    """A description and base model id published with terminal escapes (set the title, clear the screen,
    reverse the text) are shown escaped by `hub show` and `hub list`."""
    alice, bob, shared = tmp_path / "alice", tmp_path / "bob", tmp_path / "shared"
    folder = Path(shutil.copytree(technique_adapters["ia3"], tmp_path / "evil"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/m\x1b[2J"}))
    description = "ok\x1b]0;pwned\x07\x1b[31mred\u202eevil\r\nsecond"
    hub("push", folder, "--name", "x", "--version", "1.0.0", "--description", description, "--to", shared, home=alice)
    hub("pull", "x", "--from", shared, home=bob)
    shown, listed = hub("show", "x", home=bob).stdout, hub("list", home=bob).stdout
    for out in (shown, listed):
        assert not any(ch in out for ch in "\x1b\x07\r\u202e"), out
    assert "description: ok\\x1b]0;pwned\\x07\\x1b[31mred\\u202eevil\\r\\nsecond\n" in shown
    assert "org/m\\u001b[2J" in shown and "org/m\\x1b[2J" in listed  # show prints it inside JSON
    assert json.loads(hub("show", "x", "--json", home=bob).stdout)["description"] == description  # data unchanged


def test_verify_repair_asks_for_a_remote_only_when_something_needs_repair(technique_adapters, tmp_path):
    home = tmp_path / "home"  # no remotes configured
    hub("push", technique_adapters["lora"], "--name", "x", "--version", "1.0.0", home=home)
    assert hub("verify", "--repair", home=home).stdout.startswith("ok: ")
    one_line_error(hub("verify", "--repair", "--from", "nowhere", home=home, ok=False), "nowhere")
    _damage(home, "x@1.0.0")
    one_line_error(hub("verify", "--repair", home=home, ok=False), "name a remote with --from (configured: none)")
