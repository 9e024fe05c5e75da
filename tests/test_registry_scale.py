"""The registry at scale: listing that reads only what it lists, and a CLI that leaves the ML stack
unloaded for registry-only commands."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hub.refs import RefStore
from hub.registry import Registry
from tests.test_cli_registry import hub, one_line_error

pytestmark = pytest.mark.slow  # registries of many versions, the bench script as a process


def refs(result) -> list[str]:
    return [m["name"] + "@" + m["version"] for m in json.loads(result.output)]


def test_list_filters_limit_and_search(technique_adapters, hub_home, monkeypatch):
    reg = Registry()
    reg.push(technique_adapters["lora"], "team/chat", "1.0.0", description="A Friendly assistant", tags=["chat"])
    reg.push(technique_adapters["lora"], "team/chat", "1.1.0", description="friendlier")
    reg.push(technique_adapters["ia3"], "team/sql", "1.0.0", description="text to SQL")
    reg.push(technique_adapters["ia3"], "other/sum", "2.0.0", description="summaries", tags=["friendly"])
    reg.tag("team/sql@1.0.0", "stable")

    assert refs(hub("list", "--json", "--name", "team/", home=hub_home)) == [
        "team/chat@1.0.0", "team/chat@1.1.0", "team/sql@1.0.0"]
    assert refs(hub("list", "--json", "--name", "team/", "--limit", "2", home=hub_home)) == [
        "team/chat@1.0.0", "team/chat@1.1.0"]
    assert refs(hub("list", "--json", "--technique", "ia3", "--name", "team", home=hub_home)) == ["team/sql@1.0.0"]
    assert refs(hub("list", "--json", "--tag", "stable", home=hub_home)) == ["team/sql@1.0.0"]  # a tag pointing at it
    assert refs(hub("list", "--json", "--tag", "chat", home=hub_home)) == ["team/chat@1.0.0"]  # a descriptive tag
    assert refs(hub("search", "FRIENDL", "--json", home=hub_home)) == [  # description or descriptive tag, any case
        "other/sum@2.0.0", "team/chat@1.0.0", "team/chat@1.1.0"]
    assert refs(hub("search", "sql", "--json", "--limit", "1", home=hub_home)) == ["team/sql@1.0.0"]  # the name
    assert "team/chat@1.1.0" in hub("search", "friendlier", home=hub_home).output  # the table
    one_line_error(hub("list", "--limit", "0", home=hub_home, ok=False), "--limit must be at least 1")

    read: list[str] = []  # a prefix reads only the versions it names, and reading stops at the limit
    get = RefStore.get
    monkeypatch.setattr(RefStore, "get", lambda self, name, version: (read.append(f"{name}@{version}"),
                                                                      get(self, name, version))[1])
    assert [m.ref for m in Registry().list(name="team/", limit=1)] == ["team/chat@1.0.0"]
    assert read == ["team/chat@1.0.0"]


def test_registry_commands_do_not_import_the_ml_stack(technique_adapters, hub_home, tmp_path):
    """`hub list/search/show/tag/untag/export` run in a process that never imports torch or transformers (importing them
    costs seconds; none of these touches a tensor). `hub pull` is not among them: it checks the pulled
    tensors as push does (finite values, dtypes, ranks), which needs torch."""
    remote = tmp_path / "remote"
    Registry(remote).push(technique_adapters["lora"], "demo", "1.0.0", description="demo adapter")
    script = ("import sys\nfrom hub.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    assert not e.code, e.code\nloaded = sorted({m.split('.')[0] for m in sys.modules} & "
              "{'torch', 'transformers', 'peft', 'safetensors'})\nprint('ML stack:', loaded)\n")
    env = {**os.environ, "HUB_HOME": str(hub_home)}
    assert "pulled demo@1.0.0" in hub("pull", "demo@1.0.0", "--from", remote, home=hub_home).output
    for args in (["list"], ["list", "--name", "de", "--limit", "5"],
                 ["search", "adapter"], ["show", "demo"], ["tag", "demo@1.0.0", "stable"], ["show", "demo@stable"],
                 ["export"], ["untag", "demo@stable"]):
        done = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=Path(__file__).parent.parent,
                              capture_output=True, text=True)
        assert done.returncode == 0, (args, done.stderr)
        assert done.stdout.splitlines()[-1] == "ML stack: []", (args, done.stdout)


def test_pull_from_a_directory_remote_checks_only_the_version_it_takes(technique_adapters, hub_home, tmp_path):
    """A damaged entry elsewhere in a remote's index does not stop a pull of another adapter (the old reader
    validated the whole remote index first); pulling the damaged one is refused in one line, nothing written."""
    remote = tmp_path / "remote"
    Registry(remote).push(technique_adapters["lora"], "good", "1.0.0")
    Registry(remote).push(technique_adapters["ia3"], "bad", "1.0.0")
    path = remote / "refs" / "_" / "bad" / "versions" / "1.0.0.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sha256": "0" * 64}))

    assert "pulled good@1.0.0" in hub("pull", "good", "--from", remote, home=hub_home).output
    one_line_error(hub("pull", "bad", "--from", remote, home=hub_home, ok=False), "bad@1.0.0: digest does not match")
    assert [m.ref for m in Registry().list()] == ["good@1.0.0"]


def test_push_takes_several_folders_with_name_templates(technique_adapters, hub_home, tmp_path):
    """A bulk import: `{dir}` in --name/--version stands for each folder's name; every name is checked before
    anything is pushed, and a folder that fails stops the run with one line saying which, keeping those before."""
    folders = [shutil.copytree(technique_adapters[t], tmp_path / "in" / t) for t in ("lora", "ia3", "bitfit")]
    out = hub("push", *folders, "--name", "team/{dir}", "--version", "1.0.0", home=hub_home).stdout
    assert [line.split()[1] for line in out.splitlines()] == ["team/lora@1.0.0", "team/ia3@1.0.0", "team/bitfit@1.0.0"]
    assert [m.ref for m in Registry().list()] == ["team/bitfit@1.0.0", "team/ia3@1.0.0", "team/lora@1.0.0"]

    one_line_error(hub("push", *folders, "--name", "x", "--version", "1.0.0", home=hub_home, ok=False),
                   "would both be x@1.0.0: put {dir} in --name or --version")
    one_line_error(hub("push", *folders, "--name", "a b/{dir}", "--version", "1.0.0", home=hub_home, ok=False),
                   "invalid adapter name 'a b/lora'")
    one_line_error(hub("push", *folders, home=hub_home, ok=False), "give --name and --version to push several folders")
    one_line_error(hub("push", *folders, "--name", "y/{dir}", "--version", "1.0.0", "--to", tmp_path / "remote",
                       home=hub_home, ok=False), "--to takes one folder")
    bad = tmp_path / "in" / "notes"
    bad.mkdir()
    (bad / "notes.txt").write_text("not an adapter")
    one_line_error(hub("push", folders[0], bad, folders[1], "--name", "more/{dir}", "--version", "1.0.0",
                       home=hub_home, ok=False), "1 of 3 folders were pushed before it")
    assert [m.ref for m in Registry().list(name="more/")] == ["more/lora@1.0.0"]
