"""The refs/ index (one file per version and per adapter's tags): what a change touches, what a lookup reads,
kill -9 and concurrent writers with real processes, migration from registry.json, and its export."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import legacy_registry
from hub.errors import Conflict, HubError, IndexCorrupt
from hub.index import check_index
from hub.registry import Registry
from hub.store import TMP_DIR
from tests.test_cli_registry import hub, one_line_error
from tests.test_registry_concurrency import kill, wait_for_stage


def hub_process(*args: str, home: Path, pause: float | None = None, pause_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "HUB_HOME": str(home)}
    if pause is not None:
        env["HUB_PUSH_PAUSE"] = str(pause)
    if pause_at is not None:
        env["HUB_PUSH_PAUSE_AT"] = pause_at
    return subprocess.Popen([sys.executable, "-m", "hub", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def files(root: Path) -> dict[str, tuple[int, int]]:
    """Every index file under refs/ with its (inode, mtime): a rename-written file changes both."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted((root / "refs").rglob("*.json"))}


def test_the_layout_and_a_change_touches_only_its_adapters_files(technique_adapters, hub_home):
    reg = Registry()
    for name in ("a", "team/b", "team/c"):
        reg.push(technique_adapters["ia3"], name, "1.0.0")
    reg.tag("team/b@1.0.0", "stable")
    assert not (hub_home / "registry.json").exists()
    assert set(files(hub_home)) == {"refs/_/a/versions/1.0.0.json", "refs/team/b/versions/1.0.0.json",
                                    "refs/team/c/versions/1.0.0.json", "refs/team/b/tags.json"}
    assert json.loads((hub_home / "refs/team/b/tags.json").read_text()) == {"stable": "1.0.0"}
    before = files(hub_home)
    reg.push(technique_adapters["lora"], "team/c", "1.1.0")
    reg.tag("team/c@1.1.0", "stable")
    reg.remove("a@1.0.0")
    after = files(hub_home)
    assert {k: v for k, v in after.items() if before.get(k) != v} == {
        k: after[k] for k in ("refs/team/c/versions/1.1.0.json", "refs/team/c/tags.json")}
    assert set(before) - set(after) == {"refs/_/a/versions/1.0.0.json"}
    assert [m.ref for m in reg.list()] == ["team/b@1.0.0", "team/c@1.0.0", "team/c@1.1.0"]
    with pytest.raises(Conflict, match="immutable"):  # a version file is never replaced
        reg.push(technique_adapters["lora"], "team/b", "1.0.0")


def test_a_lookup_reads_only_its_adapters_files(technique_adapters, hub_home):
    """Damage in another adapter's files does not stop a lookup; resolving it, listing and verify find it."""
    reg = Registry()
    reg.push(technique_adapters["ia3"], "good", "1.0.0")
    reg.push(technique_adapters["ia3"], "bad", "1.0.0")
    reg.tag("good@1.0.0", "prod")
    (hub_home / "refs/_/bad/versions/1.0.0.json").write_text("{not json")
    fresh = Registry()
    assert fresh.resolve("good@prod").ref == "good@1.0.0" and fresh.resolve("good").ref == "good@1.0.0"
    for read in (lambda: fresh.resolve("bad"), fresh.list, fresh.verify):
        with pytest.raises(IndexCorrupt, match="bad/versions/1.0.0.json: not valid JSON"):
            read()
    one_line_error(hub("show", "bad", home=hub_home, ok=False), "not valid JSON")
    (hub_home / "refs/_/bad/versions/1.0.0.json").unlink()
    (hub_home / "refs/_/good/tags.json").write_text(json.dumps({"prod": "9.9.9"}))  # a tag pointing at nothing
    with pytest.raises(IndexCorrupt, match="points at missing version 9.9.9"):
        fresh.resolve("good@prod")
    with pytest.raises(IndexCorrupt, match="points at missing version 9.9.9"):
        fresh.verify()
    (hub_home / "refs/_/good/tags.json").write_text(json.dumps({"bad tag": "1.0.0"}))
    one_line_error(hub("list", home=hub_home, ok=False), "invalid tag 'bad tag'")


def test_a_tag_killed_mid_write_leaves_the_old_tags(technique_adapters, hub_home):
    reg = Registry()
    reg.push(technique_adapters["ia3"], "n", "1.0.0")
    reg.push(technique_adapters["lora"], "n", "1.1.0")
    reg.tag("n@1.0.0", "stable")
    proc = hub_process("tag", "n@1.1.0", "stable", home=hub_home, pause=60, pause_at="index-temp-written#1")
    wait_for_stage(proc, "index-temp-written#1")
    kill(proc)
    assert Registry().resolve("n@stable").version == "1.0.0" and Registry().verify()[1] == []
    assert Registry().gc().temps == 1 and not any((hub_home / TMP_DIR).iterdir())
    assert Registry().tag("n@1.1.0", "stable").version == "1.1.0"  # the lock died with the process


def test_tags_from_many_processes_at_once_all_land(technique_adapters, hub_home):
    """Every tag is a read-modify-write of one tags.json under the adapter's lock: none is lost."""
    Registry().push(technique_adapters["ia3"], "n", "1.0.0")
    procs = [hub_process("tag", "n@1.0.0", f"t{i}", home=hub_home, pause=0.1) for i in range(6)]
    assert all(p.wait(timeout=300) == 0 for p in procs), [p.stderr.read() for p in procs]
    assert Registry().tags("n") == {f"t{i}": "1.0.0" for i in range(6)}


def test_migrate_converts_a_registry_json_registry_atomically(technique_adapters, hub_home, tmp_path):
    old = legacy_registry(hub_home)  # what today's code wrote
    old.push(technique_adapters["ia3"], "team/ia3", "1.0.0", description="kept")
    old.push(technique_adapters["lora"], "lora", "1.0.0")
    old.push(technique_adapters["lora"], "lora", "2.0.0")
    old.tag("lora@1.0.0", "stable")
    listing = old.listing()
    assert listing == json.loads((hub_home / "registry.json").read_text())  # read in place, as it is

    # killed after staging every file, before the one rename: the old registry, whole; gc takes the staging
    proc = hub_process("migrate", home=hub_home, pause=60, pause_at="migrate-staged#1")
    wait_for_stage(proc, "migrate-staged#1")
    kill(proc)
    assert not (hub_home / "refs").exists() and Registry().listing() == listing
    assert Registry().gc().temps == 1

    stale = Registry()  # opened before the migration: it follows it
    assert "migrated 3 versions" in hub("migrate", home=hub_home).stdout
    assert not (hub_home / "registry.json").exists() and (hub_home / "registry.json.migrated").is_file()
    assert (hub_home / "refs/_/lora/versions/2.0.0.json").is_file()
    for reg in (Registry(), stale):
        assert reg.listing() == listing and reg.verify()[1] == []
        assert reg.resolve("lora@stable").version == "1.0.0"
    stale.push(technique_adapters["bitfit"], "bitfit", "1.0.0")  # written to refs/
    assert (hub_home / "refs/_/bitfit/versions/1.0.0.json").is_file()
    one_line_error(hub("migrate", home=hub_home, ok=False), "already in the refs/ layout")


def test_migrate_refuses_a_damaged_index_and_writes_nothing(technique_adapters, hub_home):
    old = legacy_registry(hub_home)
    old.push(technique_adapters["ia3"], "a", "1.0.0")
    data = json.loads((hub_home / "registry.json").read_text())
    data["adapters"]["a"]["versions"]["1.0.0"]["sha256"] = "0" * 64
    (hub_home / "registry.json").write_text(json.dumps(data))
    one_line_error(hub("migrate", home=hub_home, ok=False), "a@1.0.0: digest does not match")
    assert not (hub_home / "refs").exists() and not any((hub_home / TMP_DIR).iterdir())
    one_line_error(hub("migrate", "--registry", hub_home / "nowhere", home=hub_home, ok=False), "no registry folder")


def test_a_writer_of_registry_json_refuses_once_it_was_migrated(technique_adapters, hub_home):
    from hub.index import JsonStore

    old = legacy_registry(hub_home)
    old.push(technique_adapters["ia3"], "a", "1.0.0")
    writer = JsonStore(hub_home)  # a process that chose registry.json just before the migration
    Registry().migrate()
    with pytest.raises(HubError, match="migrated to refs/"):
        writer.set_tag("a", "stable", "1.0.0")


def test_export_writes_the_index_as_one_schema_valid_registry_json(technique_adapters, hub_home, tmp_path):
    reg = Registry()
    reg.push(technique_adapters["ia3"], "team/ia3", "1.0.0")
    reg.push(technique_adapters["lora"], "lora", "1.0.0")
    reg.tag("lora@1.0.0", "stable")
    out = tmp_path / "listing" / "registry.json"
    assert "wrote" in hub("export", "--out", out, home=hub_home).stdout
    data = json.loads(out.read_text())
    check_index(data, str(out))
    assert sorted(data["adapters"]) == ["lora", "team/ia3"] and data["adapters"]["lora"]["tags"] == {"stable": "1.0.0"}
    assert json.loads(hub("export", home=hub_home).stdout) == data  # stdout
    one_line_error(hub("export", "--merged", home=hub_home, ok=False), "give its REF")
    one_line_error(hub("export", "lora", home=hub_home, ok=False), "give --out DIR")
    # the exported file beside the blobs is a registry of its own, read in place
    shipped = tmp_path / "shipped"
    (shipped / "blobs").parent.mkdir()
    os.symlink(hub_home / "blobs", shipped / "blobs")
    (shipped / "registry.json").write_text(out.read_text())
    assert [m.ref for m in Registry(shipped).list()] == ["lora@1.0.0", "team/ia3@1.0.0"]


def test_a_directory_remote_uses_the_refs_layout(technique_adapters, hub_home, tmp_path):
    shared = tmp_path / "shared"
    hub("push", technique_adapters["ia3"], "--name", "team/x", "--version", "1.0.0", "--to", shared, home=hub_home)
    hub("tag", "team/x@1.0.0", "stable", home=hub_home)
    hub("push", "team/x@1.0.0", "--to", shared, home=hub_home)
    assert (shared / "refs/team/x/versions/1.0.0.json").is_file() and not (shared / "registry.json").exists()
    assert json.loads((shared / "refs/team/x/tags.json").read_text()) == {"stable": "1.0.0"}
    other = tmp_path / "other"
    assert "tagged team/x@stable -> 1.0.0" in hub("pull", "team/x@stable", "--from", shared, home=other).stdout


def test_lookups_and_listing_read_only_what_they_need_in_a_large_registry(technique_adapters, hub_home, monkeypatch):
    """At 300 adapters: resolving reads the named adapter's files alone, and `list --limit 3` reads three version
    files, whatever the registry holds; every command still works on it."""
    from hub.refs import RefStore

    reg = Registry()
    template = reg.push(technique_adapters["ia3"], "org/a000", "1.0.0")
    for i in range(1, 300):
        reg.refs.add(template.renamed(f"org/a{i:03d}" if i % 2 else f"a{i:03d}", "1.0.0"))
    reg.tag("org/a151@1.0.0", "stable")
    read: list[str] = []
    for method in ("get", "versions", "tags"):
        real = getattr(RefStore, method)
        monkeypatch.setattr(RefStore, method, lambda self, name, *rest, real=real, method=method: (
            read.append(f"{method} {name}"), real(self, name, *rest))[1])
    fresh = Registry()
    assert fresh.resolve("org/a151@stable").ref == "org/a151@1.0.0" and fresh.resolve("a150").ref == "a150@1.0.0"
    assert read == ["tags org/a151", "get org/a151", "versions a150", "get a150"]
    read.clear()
    assert [m.ref for m in fresh.list(limit=3)] == ["a002@1.0.0", "a004@1.0.0", "a006@1.0.0"]
    assert [r for r in read if r.startswith("get")] == ["get a002", "get a004", "get a006"]
    monkeypatch.undo()
    assert len(json.loads(hub("list", "--json", home=hub_home).stdout)) == 300
    assert "ref_tags: [\"stable\"]" in hub("show", "org/a151@stable", home=hub_home).stdout
    assert hub("search", "a29", "--json", home=hub_home).stdout.count('"name"') == 10  # a290 .. a299
    assert "removed a150@1.0.0" in hub("rm", "a150@1.0.0", home=hub_home).stdout
    assert len(json.loads(hub("export", home=hub_home).stdout)["adapters"]) == 299
    assert "ok: 3 files verified" in hub("verify", "org/a151", home=hub_home).stdout
