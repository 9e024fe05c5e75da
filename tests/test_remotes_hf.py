"""The Hugging Face remote. No hub is reachable here, so pulls run the real `snapshot_download` offline
against a local HF cache laid out as huggingface_hub lays it out (models--org--repo/{refs,snapshots,blobs})."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from huggingface_hub.hf_api import GitRefInfo, GitRefs

from hub.errors import IntegrityError, RemoteError
from hub.registry import Registry
from hub.remotes import Remotes
from hub.remotes.hf import HFRemote, model_card, stage
from tests.test_registry import snapshot


def populate_hf_cache(hf_home: Path, repo_id: str, folder: Path, revisions: list[str]) -> Path:
    """Put `folder` into the HF cache as one commit of `repo_id`, reachable by each revision name."""
    storage = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1("".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in files).encode()).hexdigest()
    snapshot_dir = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot_dir.mkdir(parents=True, exist_ok=True)
    for p in files:
        etag = hashlib.sha256(p.read_bytes()).hexdigest()
        shutil.copyfile(p, storage / "blobs" / etag)
        link = snapshot_dir / p.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(p.relative_to(folder).parts) + 1), "blobs", etag))
    (storage / "refs").mkdir(exist_ok=True)
    for revision in revisions:
        (storage / "refs" / revision).write_text(commit)
    return storage


def run_hub(*args: str, hub_home: Path, hf_home: Path) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process, so HF_HOME and HF_HUB_OFFLINE are read by huggingface_hub at import."""
    env = {**os.environ, "HUB_HOME": str(hub_home), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "hub", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def offline_hf_cache(tmp_path, monkeypatch) -> Path:
    """An HF_HOME for in-process pulls (huggingface_hub read its cache path at import, so point it here)."""
    from huggingface_hub import constants

    hf_home = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


def staged(technique_adapters, tmp_path, technique: str = "lora") -> tuple[Path, Registry]:
    """An artifact pushed to a local registry and staged exactly as `hub push --to hf://...` uploads it."""
    local = Registry(tmp_path / "alice")
    manifest = local.push(technique_adapters[technique], f"acme/{technique}", "1.0.0",
                          base_model=str(technique_adapters["base"]), license="apache-2.0")
    out = tmp_path / f"staged-{technique}"
    out.mkdir()
    stage(manifest, local, out)
    return out, local


def test_staged_upload_holds_the_artifact_manifest_and_card(technique_adapters, tmp_path):
    folder, local = staged(technique_adapters, tmp_path, "bitfit")
    manifest = local.resolve("acme/bitfit@1.0.0")
    assert sorted(p.name for p in folder.iterdir()) == sorted([*manifest.files, "hub-manifest.json", "README.md"])
    assert json.loads((folder / "hub-manifest.json").read_text()) == manifest.to_dict()
    card = (folder / "README.md").read_text()
    assert "license: apache-2.0" in card and "library_name" not in card  # BitFit is not a PEFT format
    # an artifact that ships its own card (PEFT writes one) keeps it byte for byte: its sha256 is in the manifest
    lora_folder, _ = staged(technique_adapters, tmp_path, "lora")
    assert (lora_folder / "README.md").read_bytes() == (technique_adapters["lora"] / "README.md").read_bytes()


def test_model_card_carries_base_model_and_peft_library(technique_adapters, tmp_path):
    manifest = Registry(tmp_path / "r").push(technique_adapters["ia3"], "acme/ia3", "1.0.0",
                                             base_model="acme/base-not-at-hand", tags=["demo"])
    card = model_card(manifest)
    assert "base_model: acme/base-not-at-hand" in card and "library_name: peft" in card
    assert "- ia3" in card and "- demo" in card


@pytest.mark.slow  # `hub pull` as a process
def test_pull_from_hf_cache_offline_is_bit_identical(technique_adapters, tmp_path):
    folder, local = staged(technique_adapters, tmp_path, "lora")
    hf_home = tmp_path / "hf"
    populate_hf_cache(hf_home, "acme/lora", folder, ["v1.0.0", "main"])
    bob = tmp_path / "bob"
    result = run_hub("pull", "acme/lora@1.0.0", "--from", "hf://acme/lora", hub_home=bob, hf_home=hf_home)
    assert result.returncode == 0, result.stderr
    assert "pulled acme/lora@1.0.0 lora" in result.stdout
    pulled = Registry(bob).resolve("acme/lora@1.0.0")
    assert pulled.sha256 == local.resolve("acme/lora@1.0.0").sha256
    assert pulled.base_model == local.resolve("acme/lora@1.0.0").base_model
    out = Registry(bob).export("acme/lora@1.0.0", tmp_path / "exported")
    for p in technique_adapters["lora"].iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes()
    a, b = load_file(technique_adapters["lora"] / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # `main` resolves to the same commit; the name in the ref is the local name
    result = run_hub("pull", "mine/lora", "--from", "hf://acme/lora", hub_home=bob, hf_home=hf_home)
    assert result.returncode == 0, result.stderr
    assert Registry(bob).resolve("mine/lora").version == "1.0.0"


def test_plain_peft_repo_is_imported(technique_adapters, tmp_path, offline_hf_cache):
    populate_hf_cache(offline_hf_cache, "someone/plain-ia3", technique_adapters["ia3"], ["main"])
    local = Registry(tmp_path / "home")
    remote = HFRemote("someone/plain-ia3")
    with pytest.raises(RemoteError, match="plain adapter repo .* give the version"):
        remote.fetch("ia3", local)
    with pytest.raises(RemoteError, match="add --revision main"):
        remote.fetch("ia3@1.0.0", local)
    manifest = remote.fetch("ia3@1.0.0", local, revision="main")
    assert manifest.technique == "ia3" and manifest.lineage["imported_from"] == "hf://someone/plain-ia3@main"
    assert Registry(tmp_path / "home").verify() == (3, [])


def test_tampered_hf_cache_is_refused_and_nothing_changes(technique_adapters, tmp_path, offline_hf_cache):
    folder, _ = staged(technique_adapters, tmp_path, "ia3")
    storage = populate_hf_cache(offline_hf_cache, "acme/ia3", folder, ["v1.0.0"])
    weights = (storage / "snapshots").glob("*/adapter_model.safetensors").__next__().resolve()
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    local = Registry(tmp_path / "home")
    local.push(technique_adapters["bitfit"], "keep", "1.0.0")
    before = snapshot(local.root)
    with pytest.raises(IntegrityError, match="tampered or corrupted"):
        HFRemote("acme/ia3").fetch("acme/ia3@1.0.0", local)
    assert snapshot(local.root) == before


def test_missing_revision_and_wrong_version_are_clear_errors(technique_adapters, tmp_path, offline_hf_cache):
    folder, _ = staged(technique_adapters, tmp_path, "ia3")
    populate_hf_cache(offline_hf_cache, "acme/ia3", folder, ["v1.0.0", "v2.0.0"])  # v2.0.0 points at 1.0.0's commit
    local = Registry(tmp_path / "home")
    with pytest.raises(RemoteError, match=r"hf://acme/ia3@v3.0.0: cannot download"):
        HFRemote("acme/ia3").fetch("acme/ia3@3.0.0", local)
    with pytest.raises(RemoteError, match="holds version 1.0.0, not 2.0.0"):
        HFRemote("acme/ia3").fetch("acme/ia3@2.0.0", local)
    assert local.list() == []


def test_push_is_a_thin_use_of_the_client(technique_adapters, tmp_path, monkeypatch):
    """The hub is unreachable here: record what the real client is asked to do (repo, files, tag). Every call is
    bound to the real HfApi method's signature, so a renamed or misplaced argument fails here as it would there."""
    import inspect

    import huggingface_hub

    real_api = huggingface_hub.HfApi
    calls = []

    class RecordingApi:
        def __getattr__(self, name: str):
            real = getattr(real_api, name)  # AttributeError for a method the client lacks

            def record(*args, **kwargs):
                bound = inspect.signature(real).bind(self, *args, **kwargs)  # TypeError on a drifted call
                arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
                if name == "upload_folder":
                    arguments["folder_path"] = sorted(p.name for p in Path(arguments["folder_path"]).iterdir())
                    calls.append((name, arguments))
                    return huggingface_hub.CommitInfo(commit_url="https://huggingface.co/acme/lora/commit/c0ffee",
                                                      commit_message="", commit_description="", oid="c0ffee")
                calls.append((name, arguments))
                if name == "list_repo_refs":  # a new repo: no tags, no branches but main
                    return GitRefs(branches=[GitRefInfo("main", "refs/heads/main", "0" * 40)], converts=[], tags=[])

            return record

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    local = Registry(tmp_path / "home")
    manifest = local.push(technique_adapters["lora"], "acme/lora", "1.2.0")
    assert Remotes(local.root).open("hf://acme/lora").publish(manifest, local) == "hf://acme/lora@v1.2.0"
    assert calls == [
        ("create_repo", dict(repo_id="acme/lora", exist_ok=True)),
        ("list_repo_refs", dict(repo_id="acme/lora")),
        ("upload_folder", dict(repo_id="acme/lora", folder_path=["README.md", "adapter_config.json",
                                                                  "adapter_model.safetensors", "hub-manifest.json"],
                               delete_patterns="*", commit_message="acme/lora@1.2.0 (lora)")),
        ("create_tag", dict(repo_id="acme/lora", tag="v1.2.0", revision="c0ffee")),
    ]


def test_push_carries_the_versions_tags_as_git_tags(technique_adapters, tmp_path, monkeypatch):
    """Each tag of the version becomes a git tag on the pushed commit; one that exists is deleted first
    (git tags do not move), one that does not is simply created."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import RevisionNotFoundError

    calls, existing = [], {"stable"}

    class RecordingApi:
        def create_repo(self, repo_id, exist_ok):
            pass

        def list_repo_refs(self, repo_id):
            return GitRefs(branches=[], converts=[], tags=[])

        def upload_folder(self, repo_id, folder_path, delete_patterns, commit_message):
            return type("Commit", (), {"oid": "c0ffee"})()

        def delete_tag(self, repo_id, tag):
            if tag not in existing:
                raise RevisionNotFoundError(f"no tag {tag}", response=httpx2.Response(404, request=httpx2.Request(
                    "DELETE", f"https://huggingface.co/api/models/{repo_id}/tag/{tag}")))
            calls.append(("delete_tag", tag))

        def create_tag(self, repo_id, tag, revision):
            calls.append(("create_tag", tag, revision))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    local = Registry(tmp_path / "home")
    manifest = local.push(technique_adapters["lora"], "acme/lora", "1.2.0")
    local.tag("acme/lora@1.2.0", "stable")
    local.tag("acme/lora@1.2.0", "prod")
    HFRemote("acme/lora").publish(manifest, local)
    assert calls == [("create_tag", "v1.2.0", "c0ffee"), ("create_tag", "prod", "c0ffee"),
                     ("delete_tag", "stable"), ("create_tag", "stable", "c0ffee")]


@pytest.mark.slow  # pulls through huggingface_hub
def test_pull_by_tag_from_hf_downloads_that_revision_and_sets_the_tag(technique_adapters, tmp_path,
                                                                      offline_hf_cache):
    folder, _ = staged(technique_adapters, tmp_path, "ia3")
    populate_hf_cache(offline_hf_cache, "acme/ia3", folder, ["v1.0.0", "stable"])
    result = run_hub("pull", "acme/ia3@stable", "--from", "hf://acme/ia3", hub_home=tmp_path / "bob",
                     hf_home=offline_hf_cache)
    assert result.returncode == 0, result.stderr
    assert "pulled acme/ia3@1.0.0" in result.stdout and "tagged acme/ia3@stable -> 1.0.0" in result.stdout


def test_evaluation_records_travel_in_the_upload(technique_adapters, tmp_path):
    """Records a version has when it is pushed go up beside it (not into the artifact) and come down on pull."""
    from hub import evals

    local = Registry(tmp_path / "alice")
    manifest = local.push(technique_adapters["lora"], "acme/lora", "1.0.0", base_model=str(technique_adapters["base"]))
    records = [evals.new_record(manifest, "loss", v, 9, {"file": "val.jsonl", "sha256": "ab" * 32, "rows": 3},
                                {"id": "b", "fingerprint": "f"}, {}) for v in (1.25, 1.5)]
    evals.append(local.root, manifest, records)
    folder = tmp_path / "staged"
    folder.mkdir()
    stage(manifest, local, folder)
    assert json.loads((folder / "hub-manifest.json").read_text())["sha256"] == manifest.sha256
    hf_home = tmp_path / "hf"
    populate_hf_cache(hf_home, "acme/lora", folder, ["v1.0.0"])
    bob = tmp_path / "bob"
    result = run_hub("pull", "mine/lora@1.0.0", "--from", "hf://acme/lora", hub_home=bob, hf_home=hf_home)
    assert result.returncode == 0, result.stderr
    pulled = Registry(bob).resolve("mine/lora@1.0.0")
    assert pulled.sha256 == manifest.sha256 and sorted(pulled.files) == sorted(manifest.files)
    assert evals.read(bob, pulled) == records


class FakeHub:
    """A Hugging Face repo in memory (commits of files; branches and tags naming them), answering the client
    calls a push makes; each call is bound to the real HfApi method's signature, so a drifted call fails here
    as it would there. `cache` lays a revision into an HF cache, where a pull reads it offline."""

    def __init__(self, tmp: Path):
        self.tmp, self.commits, self.branches, self.tags = tmp, {}, {}, {}

    def __getattr__(self, name: str):
        import inspect

        from huggingface_hub.hf_api import HfApi  # the real class: the tests patch huggingface_hub.HfApi

        impl = getattr(type(self), f"_{name}")

        def call(*args, **kwargs):
            bound = inspect.signature(getattr(HfApi, name)).bind(self, *args, **kwargs)
            return impl(self, **{k: v for k, v in bound.arguments.items() if k != "self"})
        return call

    def _commit(self, files: dict[str, bytes]) -> str:
        oid = hashlib.sha1(json.dumps(sorted((k, v.hex()) for k, v in files.items())).encode()).hexdigest()
        self.commits[oid] = files
        return oid

    def _files(self, revision: str) -> dict[str, bytes]:
        return self.commits[self.tags.get(revision) or self.branches.get(revision) or revision]

    def _create_repo(self, repo_id, exist_ok):
        self.branches.setdefault("main", self._commit({}))

    def _list_repo_refs(self, repo_id):
        def refs(names, kind):
            return [GitRefInfo(n, f"refs/{kind}/{n}", c) for n, c in names.items()]
        return GitRefs(branches=refs(self.branches, "heads"), converts=[], tags=refs(self.tags, "tags"))

    def _upload_folder(self, repo_id, folder_path, delete_patterns, commit_message):
        assert delete_patterns == "*"
        self.branches["main"] = self._commit({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
        return type("Commit", (), {"oid": self.branches["main"]})()

    def _create_tag(self, repo_id, tag, revision):
        assert tag not in self.tags, f"tag {tag} exists: git tags do not move"
        self.tags[tag] = revision

    def _create_branch(self, repo_id, branch, exist_ok):
        self.branches.setdefault(branch, self.branches["main"])

    def _upload_file(self, path_or_fileobj, path_in_repo, repo_id, revision, parent_commit, commit_message):
        assert parent_commit in (None, self.branches[revision]), "the branch moved since it was read"
        self.branches[revision] = self._commit({**self._files(revision), path_in_repo: path_or_fileobj})

    def _hf_hub_download(self, repo_id, filename, revision):
        from huggingface_hub.errors import EntryNotFoundError

        files = self._files(revision)
        if filename not in files:
            raise EntryNotFoundError(f"{filename} not at {revision}")
        path = self.tmp / hashlib.sha256(files[filename]).hexdigest()
        path.write_bytes(files[filename])
        return str(path)

    def cache(self, hf_home: Path, repo_id: str, revision: str) -> None:
        folder = self.tmp / f"rev-{revision}"
        for name, data in self._files(revision).items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        populate_hf_cache(hf_home, repo_id, folder, [revision])


def test_records_made_after_the_first_push_travel_on_the_records_branch(technique_adapters, tmp_path, monkeypatch):
    """A version's tag is its content and does not move; records made later go to the `hub-evals` branch on
    the next push (merged with what is there, the artifact not uploaded again), and a pull adds both."""
    import huggingface_hub

    from hub import evals

    hub_api = FakeHub(tmp_path)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub_api)
    local = Registry(tmp_path / "alice")
    manifest = local.push(technique_adapters["lora"], "acme/lora", "1.0.0", base_model=str(technique_adapters["base"]))
    first, later = (evals.new_record(manifest, "loss", v, 9, {"file": "val.jsonl", "sha256": "ab" * 32, "rows": 3},
                                     {"id": "b", "fingerprint": "f"}, {}) for v in (1.25, 1.5))
    evals.append(local.root, manifest, [first])
    remote = HFRemote("acme/lora")
    assert remote.publish(manifest, local) == "hf://acme/lora@v1.0.0"
    tagged = hub_api.tags["v1.0.0"]
    evals.append(local.root, manifest, [later])
    remote.publish(manifest, local)
    remote.publish(manifest, local)  # nothing new: no commit
    assert hub_api.tags["v1.0.0"] == tagged and len(hub_api.commits) == 4  # empty main, version, branch x2
    held = hub_api._files("hub-evals")["hub-evals/1.0.0.jsonl"].decode()
    assert [json.loads(line)["id"] for line in held.splitlines()] == [first["id"], later["id"]]

    hf_home = tmp_path / "hf"
    hub_api.cache(hf_home, "acme/lora", "v1.0.0")
    hub_api.cache(hf_home, "acme/lora", "hub-evals")
    bob = tmp_path / "bob"
    result = run_hub("pull", "acme/lora@1.0.0", "--from", "hf://acme/lora", hub_home=bob, hf_home=hf_home)
    assert result.returncode == 0, result.stderr
    assert evals.read(bob, Registry(bob).resolve("acme/lora@1.0.0")) == [first, later]


def test_pushing_other_content_under_a_published_version_is_refused(technique_adapters, tmp_path, monkeypatch):
    import huggingface_hub

    hub_api = FakeHub(tmp_path)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub_api)
    alice, carol = Registry(tmp_path / "alice"), Registry(tmp_path / "carol")
    HFRemote("acme/x").publish(alice.push(technique_adapters["lora"], "acme/x", "1.0.0"), alice)
    commits = dict(hub_api.commits)
    other = carol.push(technique_adapters["ia3"], "acme/x", "1.0.0")
    with pytest.raises(RemoteError, match=r"hf://acme/x@v1.0.0 holds other content .* push a new version"):
        HFRemote("acme/x").publish(other, carol)
    assert hub_api.commits == commits
