"""Directory remotes: a shared registry folder, and a git checkout whose registry.json lists adapters
shipped in the repo (versions with a relative `path`)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hub.errors import Conflict, IntegrityError, NotFound, RemoteError
from hub.registry import Registry
from hub.remotes import Remotes, parse_url
from hub.remotes.directory import DirectoryRemote
from tests.test_registry import snapshot


def test_push_to_and_pull_from_a_directory_remote(technique_adapters, tmp_path):
    alice, bob, shared = Registry(tmp_path / "alice"), Registry(tmp_path / "bob"), tmp_path / "shared"
    manifest = alice.push(technique_adapters["lora"], "team/lora", "1.0.0")
    remote = parse_url(f"file://{shared}")
    assert isinstance(remote, DirectoryRemote) and remote.url == str(shared.resolve())
    remote.publish(manifest, alice)
    remote.publish(manifest, alice)  # the same again: a no-op
    assert [m.ref for m in Registry(shared).list()] == ["team/lora@1.0.0"]
    pulled = remote.fetch("team/lora", bob)
    assert pulled.sha256 == manifest.sha256 and pulled.created == manifest.created and pulled.path is None
    assert bob.verify() == (3, [])


def test_pull_conflicting_local_version_is_refused(technique_adapters, tmp_path):
    shared, local = Registry(tmp_path / "shared"), Registry(tmp_path / "local")
    shared.push(technique_adapters["lora"], "x", "1.0.0")
    local.push(technique_adapters["ia3"], "x", "1.0.0")
    before = snapshot(local.root)
    with pytest.raises(Conflict):
        DirectoryRemote(shared.root).fetch("x@1.0.0", local)
    assert snapshot(local.root) == before


def test_pull_from_a_checkout_registry_with_in_repo_adapters(technique_adapters, tmp_path):
    """How `hub pull` works from the repo's own registry.json: versions point at folders in the checkout."""
    repo = tmp_path / "checkout"
    for technique in ["bitfit", "prompt_tuning"]:
        shutil.copytree(technique_adapters[technique], repo / "adapters" / technique)
        Registry(repo).push(repo / "adapters" / technique, f"demo/{technique}", "1.0.0", in_place=True)
    fresh = tmp_path / "fresh-clone"
    shutil.copytree(repo, fresh, ignore=shutil.ignore_patterns(".tmp", ".registry.lock"))

    local = Registry(tmp_path / "home")
    Remotes(local.root).add("repo", str(fresh))
    remote = Remotes(local.root).open("repo")
    m = remote.fetch("demo/bitfit@1.0.0", local)
    assert m.path is None and local.resolve("demo/bitfit").sha256 == Registry(fresh).resolve("demo/bitfit").sha256
    folder = local.materialize(m)
    for p in (fresh / "adapters" / "bitfit").iterdir():
        assert (folder / p.name).read_bytes() == p.read_bytes()
    assert not (fresh / "blobs").exists() and not (fresh / "checkouts").exists()  # pulling never writes the checkout


def test_tampered_in_repo_adapter_is_refused(technique_adapters, tmp_path):
    repo = tmp_path / "checkout"
    shutil.copytree(technique_adapters["bitfit"], repo / "adapters" / "bitfit")
    Registry(repo).push(repo / "adapters" / "bitfit", "demo/bitfit", "1.0.0", in_place=True)
    weights = repo / "adapters" / "bitfit" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    local = Registry(tmp_path / "home")
    with pytest.raises(IntegrityError, match="tampered or corrupted"):
        DirectoryRemote(repo).fetch("demo/bitfit", local)
    assert local.list() == [] and list(local.store.stored()) == []


def test_missing_remote_and_ref_are_clear(technique_adapters, tmp_path):
    local = Registry(tmp_path / "home")
    with pytest.raises(NotFound, match="is not a registry"):
        DirectoryRemote(tmp_path / "nowhere").fetch("x", local)
    Registry(tmp_path / "shared").push(technique_adapters["lora"], "x", "1.0.0")
    with pytest.raises(NotFound, match="no adapter named 'y'"):
        DirectoryRemote(tmp_path / "shared").fetch("y", local)
    with pytest.raises(RemoteError, match="Hugging Face remotes only"):
        DirectoryRemote(tmp_path / "shared").fetch("x", local, revision="main")


def test_remotes_file_is_kept_beside_the_index(tmp_path):
    remotes = Remotes(tmp_path / "home")
    assert remotes.add("a", "relative/dir") == str(Path("relative/dir").resolve())
    assert remotes.add("b", "hf://org/repo") == "hf://org/repo"
    assert Remotes(tmp_path / "home").all() == {"a": str(Path("relative/dir").resolve()), "b": "hf://org/repo"}
    assert Remotes(tmp_path / "home").open("b").url == "hf://org/repo"
    assert Remotes(tmp_path / "home").open("hf://other/repo").url == "hf://other/repo"  # a URL works unnamed
    (tmp_path / "home" / "remotes.json").write_text("[1, 2]")
    with pytest.raises(RemoteError, match="expected an object"):
        Remotes(tmp_path / "home").all()
