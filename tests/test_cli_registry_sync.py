"""Registry commands between a local registry and its remotes: remote names, tags travelling both ways,
publishing versions already in the registry, re-pushes, and repairing damaged blobs from a remote."""
from __future__ import annotations

from pathlib import Path

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
