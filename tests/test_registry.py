"""The registry API: push, resolve, materialize, export, immutability, integrity, gc, and bad input."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hub.artifact import ArtifactError, read_adapter
from hub.errors import Conflict, HubError, IndexCorrupt, IntegrityError, InvalidName, NotFound
from hub.index import Index
from hub.registry import Registry
from helpers import legacy_registry

TECHNIQUES = ["lora", "ia3", "prompt_tuning", "bitfit", "bottleneck"]
REPO_ROOT = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under a registry (but lock files) with its sha256: to prove nothing changed."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".lock"))
    } if root.exists() else {}


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_push_materialize_export_is_bit_identical(technique, technique_adapters, hub_home, tmp_path):
    src = technique_adapters[technique]
    reg = Registry()
    m = reg.push(src, f"org/{technique}-demo", "1.0.0", base_model=str(technique_adapters["base"]),
                 description="a test adapter", tags=["test"], license="apache-2.0")
    assert (m.technique, m.ref, m.tags, m.license) == (technique, f"org/{technique}-demo@1.0.0", ["test"], "apache-2.0")
    assert m.base_model.fingerprint is not None and m.params == read_adapter(src).num_parameters
    for p in src.iterdir():
        assert m.files[p.name] == {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    assert [x.ref for x in reg.list()] == [m.ref]
    assert [x.ref for x in reg.list(technique=technique)] == [m.ref]
    with pytest.raises(InvalidName, match="unknown technique 'nope'"):  # a typo is not an empty registry
        reg.list(technique="nope")

    from_folder = read_adapter(reg.materialize(m))  # a folder read_adapter takes
    direct = reg.read(m)  # the server's cold load: stored files read once, checked, parsed
    assert (direct.technique, direct.config) == (from_folder.technique, from_folder.config)
    assert direct.tensors.keys() == from_folder.tensors.keys()
    assert all(torch.equal(direct.tensors[k], from_folder.tensors[k]) for k in direct.tensors)
    out = reg.export(m.ref, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    for p in src.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes()
    original, exported = load_file(src / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) and original[k].dtype == exported[k].dtype for k in original)


def test_manifest_records_base_fingerprint_and_hyperparams(technique_adapters, hub_home):
    from transformers import AutoConfig

    from hub.checkpoint import check_fits, fingerprint

    adapter = read_adapter(technique_adapters["lora"])
    config = AutoConfig.from_pretrained(technique_adapters["base"])
    m = Registry().push(technique_adapters["lora"], "lora", "1.0.0", base_model=str(technique_adapters["base"]))
    assert m.base_model.fingerprint == fingerprint(config, check_fits(adapter, config))
    assert m.base_model.id == str(technique_adapters["base"].resolve())
    assert m.hyperparams == {"r": 4, "lora_alpha": 8}
    assert m.target_modules == ["q_proj", "v_proj"] and m.dtype == "float32"
    assert m.lineage == {"parents": []}
    assert [x.ref for x in Registry().list(base_model=str(technique_adapters["base"]))] == ["lora@1.0.0"]
    assert Registry().list(base_model="some/other-base") == []


def test_push_without_base_records_no_fingerprint(technique_adapters, hub_home):
    m = Registry().push(technique_adapters["bitfit"], "bitfit", "0.1.0")
    assert m.base_model.id is None and m.base_model.fingerprint is None


def test_same_content_again_is_a_noop_and_different_content_conflicts(technique_adapters, hub_home, tmp_path):
    reg = Registry()
    first = reg.push(technique_adapters["lora"], "lora", "1.0.0")
    before = snapshot(hub_home)
    again = reg.push(technique_adapters["lora"], "lora", "1.0.0")
    assert again.created == first.created and snapshot(hub_home) == before

    changed = copy_adapter(technique_adapters["lora"], tmp_path / "changed")
    tensors = load_file(changed / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(changed / "adapter_model.safetensors"))
    with pytest.raises(Conflict, match="immutable"):
        reg.push(changed, "lora", "1.0.0")
    assert snapshot(hub_home) == before
    assert reg.push(changed, "lora", "1.0.1").sha256 != first.sha256


def test_references_latest_version_tags_and_namespaces(technique_adapters, hub_home):
    reg = Registry()
    for version in ["1.9.0", "1.10.0", "1.10.1-rc.1", "0.3.0"]:
        reg.push(technique_adapters["ia3"], "acme/ia3", version)
    assert reg.resolve("acme/ia3").version == "1.10.1-rc.1"
    reg.push(technique_adapters["ia3"], "acme/ia3", "1.10.1")
    assert reg.resolve("acme/ia3").version == "1.10.1"  # a release outranks its pre-release
    assert reg.resolve("acme/ia3@1.9.0").version == "1.9.0"
    reg.tag("acme/ia3@1.9.0", "stable")
    assert reg.resolve("acme/ia3@stable").version == "1.9.0"
    reg.tag("acme/ia3@1.10.0", "stable")  # tags move
    assert reg.resolve("acme/ia3@stable").version == "1.10.0"
    with pytest.raises(LookupError, match="no tag 'beta'"):
        reg.resolve("acme/ia3@beta")
    with pytest.raises(NotFound, match="no version 2.0.0"):
        reg.resolve("acme/ia3@2.0.0")
    with pytest.raises(NotFound, match="no adapter named"):
        reg.resolve("other/ia3")


@pytest.mark.parametrize("name", [
    "../evil", "/etc/passwd", "a/../../b", "a/b/c", "a..b", ".hidden", "a b", "", "org/", "a\\b", "x" * 200, "näme",
])
def test_names_that_could_escape_are_refused(name, technique_adapters, hub_home):
    with pytest.raises(InvalidName):
        Registry().push(technique_adapters["lora"], name, "1.0.0")
    assert not hub_home.exists()


@pytest.mark.parametrize("ref", ["lora@../x", "lora@1.0", "lora@01.0.0", "lora@", "lora@-x"])
def test_malformed_references_are_refused(ref, hub_home):
    with pytest.raises(InvalidName):
        Registry().resolve(ref)


def test_bad_tag_is_refused(technique_adapters, hub_home):
    reg = Registry()
    reg.push(technique_adapters["lora"], "lora", "1.0.0")
    with pytest.raises(InvalidName):
        reg.tag("lora@1.0.0", "1.2.3")  # a tag that reads as a version would make refs ambiguous


def _truncate(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _corrupt_header(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8
    path.write_bytes(bytes(data))


def _drop_config(folder: Path) -> None:
    (folder / "adapter_config.json").unlink()


def _malform_config(folder: Path) -> None:
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", ')


def _unknown_peft_type(folder: Path) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))


def _unknown_own_type(folder: Path) -> None:
    (folder / "adapter_config.json").write_text(json.dumps({"adapter_type": "compacter"}))


def _dora(folder: Path) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))


def _nested(folder: Path) -> None:
    (folder / "other").mkdir()
    (folder / "other" / "adapter_model.safetensors").write_bytes(b"x")


@pytest.mark.parametrize("damage, message", [
    (_truncate, "not a valid safetensors file"),
    (_corrupt_header, "not a valid safetensors file"),
    (_drop_config, "no adapter_config.json"),
    (_malform_config, "malformed JSON"),
    (_unknown_peft_type, "PEFT type 'LOHA' is not served"),
    (_unknown_own_type, "unknown adapter config"),
    (_dora, "use_dora=true is not served"),
    (_nested, "sub-folder"),
])
def test_bad_artifact_is_refused_and_registry_unchanged(damage, message, technique_adapters, hub_home, tmp_path):
    reg = Registry()
    reg.push(technique_adapters["ia3"], "keep", "1.0.0")
    before = snapshot(hub_home)
    folder = copy_adapter(technique_adapters["lora"], tmp_path / "bad")
    damage(folder)
    with pytest.raises(ArtifactError, match=message):
        reg.push(folder, "bad", "1.0.0")
    assert snapshot(hub_home) == before


def test_shapes_that_do_not_fit_the_base_are_refused(technique_adapters, hub_home, tmp_path):
    from helpers import tiny_llama

    wider = tmp_path / "wider-base"
    tiny_llama(hidden_size=96, num_attention_heads=4, num_key_value_heads=2).save_pretrained(wider)
    reg = Registry()
    for technique in ["lora", "ia3", "bitfit", "bottleneck", "prompt_tuning"]:
        with pytest.raises(ArtifactError, match=f"does not fit base model {wider}"):
            reg.push(technique_adapters[technique], technique, "1.0.0", base_model=str(wider))
    fewer_layers = tmp_path / "one-layer"
    tiny_llama(num_hidden_layers=1).save_pretrained(fewer_layers)
    with pytest.raises(ArtifactError, match=r"model.layers.1.* does not exist"):
        reg.push(technique_adapters["lora"], "lora", "1.0.0", base_model=str(fewer_layers))
    assert reg.list() == [] and not (hub_home / "registry.json").exists()


def test_base_named_but_not_at_hand_is_recorded_unchecked(technique_adapters, hub_home):
    m = Registry().push(technique_adapters["lora"], "lora", "1.0.0", base_model="no-such-org/no-such-model")
    assert (m.base_model.id, m.base_model.fingerprint) == ("no-such-org/no-such-model", None)


def _tamper_blob(reg: Registry, ref: str) -> Path:
    m = reg.resolve(ref)
    blob = reg.store.path(m.files["adapter_model.safetensors"]["sha256"])
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    return blob


def test_tampered_blob_fails_verify_and_materialize(technique_adapters, hub_home):
    reg = Registry()
    reg.push(technique_adapters["lora"], "lora", "1.0.0")
    reg.push(technique_adapters["ia3"], "ia3", "1.0.0")
    assert reg.verify() == (6, [])
    _tamper_blob(reg, "lora@1.0.0")
    checked, problems = reg.verify()
    assert checked == 6 and len(problems) == 1 and "lora@1.0.0: adapter_model.safetensors" in problems[0]
    assert reg.verify("ia3@1.0.0") == (3, [])
    with pytest.raises(IntegrityError, match="tampered or corrupted"):
        reg.materialize(reg.resolve("lora@1.0.0"))
    with pytest.raises(IntegrityError, match=r"lora@1.0.0: adapter_model.safetensors: .*\(tampered or corrupted"):
        reg.read(reg.resolve("lora@1.0.0"))
    assert reg.read(reg.resolve("ia3@1.0.0")).technique.value == "ia3"


def test_read_deferred_hashes_in_another_thread_and_verified_refuses_damaged_bytes(technique_adapters, hub_home,
                                                                                   monkeypatch):
    """The server's cold load parses and prepares while the sha256 runs; `verified()` is the gate."""
    import threading

    import hub.registry as registry_module

    reg = Registry()
    m = reg.push(technique_adapters["lora"], "lora", "1.0.0")
    threads, real = [], hashlib.sha256
    monkeypatch.setattr(registry_module.hashlib, "sha256",
                        lambda data: threads.append(threading.current_thread().name) or real(data))
    adapter, verified = reg.read_deferred(m)
    verified()
    assert threads and all(name.startswith("hub-sha256") for name in threads)
    assert adapter.tensors.keys() == load_file(technique_adapters["lora"] / "adapter_model.safetensors").keys()
    _tamper_blob(reg, "lora@1.0.0")  # still parses: only the hash can tell
    adapter, verified = reg.read_deferred(m)
    with pytest.raises(IntegrityError, match=r"lora@1.0.0: adapter_model.safetensors: .*\(tampered or corrupted"):
        verified()


def test_read_of_damaged_unparseable_bytes_is_an_integrity_error(technique_adapters, hub_home):
    reg = Registry()
    m = reg.push(technique_adapters["lora"], "lora", "1.0.0")
    blob = reg.store.path(m.files["adapter_model.safetensors"]["sha256"])
    blob.write_bytes(blob.read_bytes()[:100])  # truncated: not a safetensors file any more
    with pytest.raises(IntegrityError, match="tampered or corrupted"):
        reg.read_deferred(m)


def test_read_writes_no_checkout_and_names_a_missing_blob(technique_adapters, hub_home):
    reg = Registry()
    m = reg.push(technique_adapters["lora"], "lora", "1.0.0")
    reg.read(m)
    assert not (hub_home / "checkouts").exists()
    reg.store.path(m.files["adapter_config.json"]["sha256"]).unlink()
    with pytest.raises(IntegrityError, match="lora@1.0.0: file adapter_config.json is missing"):
        reg.read(m)


def test_damaged_checkout_is_rebuilt_from_blobs(technique_adapters, hub_home):
    reg = Registry()
    m = reg.push(technique_adapters["lora"], "lora", "1.0.0")
    folder = reg.materialize(m)
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    assert reg.materialize(m) == folder
    assert (folder / "adapter_model.safetensors").read_bytes() == \
        (technique_adapters["lora"] / "adapter_model.safetensors").read_bytes()


def test_rm_then_gc_frees_only_unreferenced_blobs(technique_adapters, hub_home):
    reg = Registry()
    lora = reg.push(technique_adapters["lora"], "lora", "1.0.0")
    reg.push(technique_adapters["lora"], "lora-copy", "1.0.0")  # same blobs, another name
    reg.push(technique_adapters["ia3"], "ia3", "1.0.0")
    reg.materialize(reg.resolve("ia3"))
    reg.tag("ia3@1.0.0", "stable")
    with pytest.raises(InvalidName, match="give the version"):
        reg.remove("ia3")
    with pytest.raises(InvalidName, match="untag ia3@stable"):
        reg.remove("ia3@stable")
    assert reg.remove("ia3@1.0.0")[1] == ["stable"]
    assert reg.tags("ia3") == {} and [m.ref for m in reg.list()] == ["lora@1.0.0", "lora-copy@1.0.0"]
    report = reg.gc()
    assert (report.blobs, report.checkouts) == (3, 1)
    assert reg.verify() == (6, [])
    reg.remove("lora@1.0.0")
    assert reg.gc().blobs == 0  # lora-copy still refers to the same blobs
    assert reg.export("lora-copy", hub_home.parent / "out").is_dir() and lora.sha256 == reg.resolve("lora-copy").sha256


def test_in_place_versions_live_in_a_folder_of_the_registry(technique_adapters, tmp_path):
    repo = tmp_path / "repo"
    (repo / "adapters").mkdir(parents=True)
    copy_adapter(technique_adapters["bottleneck"], repo / "adapters" / "bn")
    reg = Registry(repo)
    m = reg.push(repo / "adapters" / "bn", "demo/bn", "1.0.0", in_place=True)
    assert m.path == "adapters/bn" and not (repo / "blobs").exists()
    with pytest.raises(HubError, match="not inside the registry"):
        reg.push(technique_adapters["lora"], "demo/lora", "1.0.0", in_place=True)

    moved = tmp_path / "fresh-checkout"  # paths are relative: a copy of the repo works as is
    shutil.copytree(repo, moved)
    assert Registry(moved).materialize(Registry(moved).resolve("demo/bn")) == moved / "adapters" / "bn"
    assert Registry(moved).verify() == (2, [])
    assert Registry(moved).read(Registry(moved).resolve("demo/bn")).technique.value == "bottleneck"
    (moved / "adapters" / "bn" / "adapter_config.json").write_text("{}")
    assert len(Registry(moved).verify()[1]) == 1
    with pytest.raises(IntegrityError):
        Registry(moved).materialize(Registry(moved).resolve("demo/bn"))
    with pytest.raises(IntegrityError):
        Registry(moved).read(Registry(moved).resolve("demo/bn"))


def test_repo_registry_json_is_a_valid_index():
    data = json.loads((REPO_ROOT / "registry.json").read_text())
    index = Index(data)
    for m in index.manifests():
        assert m.path is not None, "repo adapters must ship in the repo (a `path` version)"
    assert Registry(REPO_ROOT).verify()[1] == []


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"schema_version": 2, "adapters": {}}', "schema"),
    ('{"schema_version": 1, "adapters": {"../x": {"versions": {}, "tags": {}}}}', "schema"),
    ('{"schema_version": 1}', "schema"),
])
def test_corrupt_index_is_refused_clearly(content, message, hub_home):
    hub_home.mkdir()
    (hub_home / "registry.json").write_text(content)
    with pytest.raises(IndexCorrupt, match=message):
        Registry().list()


def test_index_entry_whose_digest_does_not_match_files_is_refused(technique_adapters, hub_home):
    reg = Registry()
    reg.push(technique_adapters["lora"], "lora", "1.0.0")
    path = hub_home / "refs" / "_" / "lora" / "versions" / "1.0.0.json"
    data = json.loads(path.read_text())
    data["files"]["README.md"]["sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(IndexCorrupt, match="digest does not match"):
        reg.resolve("lora")


def test_readers_share_one_index_that_refuses_changes_and_hand_out_copies(technique_adapters, hub_home):
    reg = legacy_registry(hub_home)
    reg.push(technique_adapters["lora"], "lora", "1.0.0")
    index = reg.index()
    assert reg.index() is index  # parsed once, not once per request
    with pytest.raises(RuntimeError, match="IndexFile.update"):
        index.set_tag("lora", "prod", "1.0.0")
    manifest = reg.resolve("lora")
    manifest.files["README.md"]["sha256"] = "0" * 64  # a caller changing its manifest ...
    manifest.tags.append("mine")
    again = reg.resolve("lora")  # ... changes nobody else's
    assert again.files["README.md"]["sha256"] != "0" * 64 and "mine" not in again.tags
    reg.tag("lora@1.0.0", "prod")
    assert reg.resolve("lora@prod").version == "1.0.0" and "prod" not in index.tags("lora")


def test_reader_checks_only_the_entries_it_uses(technique_adapters, hub_home, monkeypatch):
    """A lookup validates the entry it resolves, not the whole index (that cost O(versions) per new process);
    damage elsewhere is still found by what reads it: resolving it, listing, `verify`."""
    server, pusher = legacy_registry(hub_home), Registry()  # two processes' views of one registry folder
    for name in ("a", "b", "c"):
        pusher.push(technique_adapters["ia3"], name, "1.0.0")
    checked: list[list[str]] = []
    check = Index._check
    monkeypatch.setattr(Index, "_check", lambda self, names: (checked.append(sorted(names)), check(self, names))[1])
    server.resolve("a")
    server.resolve("a@1.0.0")
    assert checked == [["a"]]  # the entry used, once
    pusher.tag("b@1.0.0", "prod")
    assert checked == [["a"], ["b"]]  # the writer checks what it changes
    checked.clear()
    assert server.resolve("b@prod").version == "1.0.0"
    assert checked == [["b"]]  # a new index: again only the entry used

    good = (hub_home / "registry.json").read_text()
    data = json.loads(good)
    data["adapters"]["c"]["versions"]["1.0.0"]["sha256"] = "0" * 64
    (hub_home / "registry.json").write_text(json.dumps(data))
    assert server.resolve("a").ref == "a@1.0.0"
    for read in (lambda: server.resolve("c"), server.list, server.verify):
        with pytest.raises(IndexCorrupt, match="c@1.0.0: digest does not match"):
            read()
    (hub_home / "registry.json").write_text(json.dumps({**json.loads(good), "schema_version": 2}))
    with pytest.raises(IndexCorrupt, match="schema"):
        server.resolve("a")


def test_an_update_that_changes_nothing_writes_nothing(technique_adapters, hub_home):
    reg = legacy_registry(hub_home)
    reg.push(technique_adapters["ia3"], "ia3", "1.0.0")
    reg.tag("ia3@1.0.0", "prod")
    before = (hub_home / "registry.json").stat().st_ino
    reg.tag("ia3@1.0.0", "prod")
    reg.push(technique_adapters["ia3"], "ia3", "1.0.0")
    assert (hub_home / "registry.json").stat().st_ino == before


def test_registry_json_is_written_as_json_dumps_indent_1_would(technique_adapters, hub_home):
    """The index is written from per-adapter texts (unchanged entries' reused): byte for byte what
    json.dumps(index, indent=1, sort_keys=True) writes, through pushes, tags, removals and non-ASCII text."""
    reg = legacy_registry(hub_home)
    path = hub_home / "registry.json"

    def as_json_dumps() -> str:
        return json.dumps(json.loads(path.read_text()), indent=1, sort_keys=True) + "\n"

    reg.push(technique_adapters["ia3"], "team/ia3", "1.0.0", description="réglé — ✓")
    assert path.read_text() == as_json_dumps()
    reg.push(technique_adapters["lora"], "team/lora", "1.0.0")
    reg.push(technique_adapters["lora"], "team/lora", "1.1.0")
    reg.tag("team/lora@1.1.0", "prod")
    assert path.read_text() == as_json_dumps()
    reg.remove("team/lora@1.0.0")
    reg.remove("team/ia3@1.0.0")
    assert path.read_text() == as_json_dumps() and "team/ia3" not in path.read_text()


def test_index_text_reuses_the_text_of_entries_it_serialized_before():
    from hub.index import index_text

    kept, changed = {"versions": {}, "tags": {"a": "1.0.0"}}, {"versions": {}, "tags": {}}
    texts = {"kept": (kept, "KEPT-TEXT"), "changed": ({"versions": {}, "tags": {}}, "STALE")}
    text = index_text({"schema_version": 1, "adapters": {"kept": kept, "changed": changed}}, texts)
    assert '"kept": KEPT-TEXT' in text and "STALE" not in text  # the same object: reused; another: serialized
    assert texts["changed"] == (changed, json.dumps(changed, indent=1, sort_keys=True).replace("\n", "\n  "))
    fresh = {"schema_version": 1, "adapters": {"kept": kept, "changed": changed}}
    assert index_text(fresh, {}) == json.dumps(fresh, indent=1, sort_keys=True)
    assert index_text({"schema_version": 1, "adapters": {}}, texts) == json.dumps(
        {"schema_version": 1, "adapters": {}}, indent=1, sort_keys=True)


def test_export_refuses_a_non_empty_folder(technique_adapters, hub_home, tmp_path):
    reg = Registry()
    reg.push(technique_adapters["lora"], "lora", "1.0.0")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(HubError, match="not an empty folder"):
        reg.export("lora", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


ADAPTERHUB = REPO_ROOT / "tests" / "fixtures" / "bottleneck"


@pytest.mark.parametrize("fixture", ["pfeiffer", "houlsby"])  # adapter.safetensors / pytorch_adapter.bin
def test_adapterhub_folder_is_imported_on_push(fixture, hub_home, tmp_path):
    from hub.adapterhub_import import import_adapterhub

    reg = Registry()
    m = reg.push(ADAPTERHUB / "adapters" / fixture, f"ah/{fixture}", "1.0.0", base_model=str(ADAPTERHUB / "base"))
    assert m.technique == "bottleneck" and m.lineage["imported_from"] == "adapterhub"
    assert m.base_model.fingerprint is not None
    import_adapterhub(ADAPTERHUB / "adapters" / fixture, tmp_path / "direct")
    pushed = read_adapter(reg.materialize(m))
    direct = read_adapter(tmp_path / "direct")
    assert pushed.tensors.keys() == direct.tensors.keys()
    assert all(torch.equal(pushed.tensors[k], direct.tensors[k]) for k in direct.tensors)
    with pytest.raises(HubError, match="cannot be recorded in place"):
        Registry(ADAPTERHUB).push(ADAPTERHUB / "adapters" / fixture, "x", "1.0.0", in_place=True)


def test_bad_adapterhub_folder_is_refused_and_registry_unchanged(hub_home, tmp_path):
    folder = tmp_path / "houlsby"
    shutil.copytree(ADAPTERHUB / "adapters" / "houlsby", folder)
    (folder / "pytorch_adapter.bin").write_bytes(b"not a pickle")
    with pytest.raises(ArtifactError, match="not a weights-only PyTorch file"):
        Registry().push(folder, "bad", "1.0.0")
    assert snapshot(hub_home) == {}


@pytest.mark.slow
def test_real_default_base_refuses_an_adapter_for_another_shape(technique_adapters, tmp_path, real_hub_home):
    """`--base-model smollm2-135m` (or its HF id) checks against the real base's config."""
    from hub.basemodel import EMBEDDED, prepared_dir

    if not prepared_dir().is_dir():
        pytest.skip("the default base model is not prepared (`hub base prepare`)")
    reg = Registry(tmp_path / "reg")
    for base in ["smollm2-135m", EMBEDDED["smollm2-135m"].hf_id]:
        with pytest.raises(ArtifactError, match=r"does not fit base model .*lora_A has shape \(4, 64\), expected \(r, 576\)"):
            reg.push(technique_adapters["lora"], "lora", "1.0.0", base_model=base)
    assert reg.list() == []


def test_one_update_can_remove_the_last_version_of_a_name_and_add_another(technique_adapters, hub_home):
    """The name's entry is dropped and then made anew inside one locked change (it used to raise KeyError)."""
    reg = legacy_registry(hub_home)
    old = reg.push(technique_adapters["ia3"], "ia3", "1.0.0")
    other = reg.push(technique_adapters["lora"], "lora", "1.0.0")
    moved = other.to_dict() | {"name": "ia3", "version": "2.0.0"}
    with reg.refs.index_file.update() as index:
        index.remove("ia3", old.version)
        index.add(type(other).from_dict(moved))
    assert reg.index().versions("ia3") == ["2.0.0"] and reg.resolve("ia3").sha256 == other.sha256
