"""Artifact validation at the boundary: push, pull and load refuse the same things, each with one clear line.

Regular expressions from configs (hub/patterns.py), hyper-parameters, weight dtypes and values, LoRA ranks,
files that are not regular files, manifests that do not say what their files hold, and names with a
trailing newline. Bad artifacts are planted in registries by hand, as a hostile remote would hold them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file
from server_support import served_model
from test_remotes_hf import offline_hf_cache, populate_hf_cache  # noqa: F401  (offline_hf_cache: a fixture)

from hub import patterns
from hub.artifact import (CONFIG_FILE, WEIGHTS_FILE, Adapter, ArtifactError, parse_config, parse_tensors, read_buffer,
                          technique_of)
from hub.errors import IndexCorrupt
from hub.index import load_manifest
from hub.manifest import BaseModelInfo, Provenance, artifact_digest, build, check_version, sha256_file
from hub.registry import Registry
from tests.test_cli_registry import hub, one_line_error
from tests.test_registry import snapshot
from helpers import legacy_registry

# --- the matcher answers as Python's re does, and refuses what re could not answer in bounded time ---

PEFT_PATTERNS = [
    r"q_proj", r"v_proj", r"model\.layers\.0\.self_attn\.q_proj", r".*\.layers\.(0|1)\.(.*\.)?(q_proj|v_proj)",
    r"^model.layers.1.mlp.down_proj", r".*(q|v)_proj", r"layers\.[01]\.mlp\..*", r"[^.]+_proj", r"\w+\.\d+\..*",
    r"(self_attn|mlp)\.(q|down)_proj$", r"down_proj\Z", r"a{2,3}", r".*?proj", r"(?:k|v)_proj", r"",
]
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj",
         "q_proj", "model.layers.10.self_attn.q_proj", "aaa", "down_proj\n", "", "lm_head"]


@pytest.mark.parametrize("pattern", PEFT_PATTERNS)
def test_patterns_answer_as_python_re_does(pattern):
    for name in NAMES:
        assert patterns.fullmatch(pattern, name) == (re.fullmatch(pattern, name) is not None), (pattern, name)
        assert patterns.compile(pattern).match(name) == (re.match(pattern, name) is not None), (pattern, name)
        peft = re.match(rf"(.*\.)?({pattern})$", name) is not None  # peft.utils.other.get_pattern_key
        assert (patterns.pattern_key([pattern], name) == pattern) == peft, (pattern, name)


def test_module_path_keys_answer_as_python_re_does():
    """Keys of plain characters and `.` (what merges write, one per module) take a string-comparison path."""
    import itertools

    names = ["", "a", "a.b", "x.a.b", "ab\n", "a.b\n", "x\na.b", "a\n.b", ".a", "a.", "x.ab", "b"]
    for length in (1, 2, 3):
        for key in map("".join, itertools.product(["a", ".", r"\.", "b"], repeat=length)):
            for name in names:
                want = re.match(rf"(.*\.)?({key})$", name) is not None
                assert (patterns.pattern_key([key], name) == key) == want, (key, name)


@pytest.mark.parametrize("pattern, message", [
    ("(.*.*)*X", "repeats or branches"), ("(a|a)*X", "repeats or branches"), ("(a+)+$", "repeats or branches"),
    ("(.*){2,}X", "repeats or branches"), ("(a?a?)*X", "repeats or branches"),
    (".*" * 7 + "X", "more than 6 repetitions"), ("(a|a)" * 13 + "X", "multiply to more than 4096 ways"),
    (r"(q)\1", "back-references"), ("(?=q)q_proj", "lookarounds"), ("(?<!x)q", "lookarounds"),
    ("(?i)Q_PROJ", "inline flags"), (r"\bq_proj", r"\b"), ("a{1000}" * 5, "expands to more than"),
    ("q_proj(", "not a valid regular expression"), ("x" * 1100, "longer than 1024"),
])
def test_patterns_refuse_what_backtracking_could_not_bound_or_this_matcher_does_not_implement(pattern, message):
    with pytest.raises(patterns.PatternError, match=re.escape(message)):
        patterns.check(pattern)


def test_a_key_that_escapes_peft_s_group_is_refused():
    """PEFT embeds a rank_pattern key as `(.*\\.)?({key})$`: a key that closes that group is no pattern of its own."""
    with pytest.raises(patterns.PatternError, match="not a valid regular expression"):
        patterns.check_key("a)|(b")


# --- push refuses, in one line, at once ---

def _config(folder: Path, **changes) -> Path:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


def _tensors(folder: Path, change) -> Path:
    tensors = load_file(folder / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return folder


def _nan_bytes(folder: Path) -> Path:
    """0xff bytes over one lora_B tensor's data: still a valid safetensors file, now holding NaN."""
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    key = next(k for k in sorted(header) if k.endswith("layers.1.self_attn.v_proj.lora_B.weight"))
    first, last = header[key]["data_offsets"]
    data[8 + header_len + first:8 + header_len + last] = b"\xff" * (last - first)
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    return folder


def _infinite_shape(folder: Path) -> Path:
    data = (folder / WEIGHTS_FILE).read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    key = sorted(k for k in header if k != "__metadata__")[0]
    header[key]["shape"] = ["INF"]
    text = json.dumps(header).replace('"INF"', "Infinity").encode()
    (folder / WEIGHTS_FILE).write_bytes(len(text).to_bytes(8, "little") + text + data[8 + header_len:])
    return folder


def _deep_config(folder: Path) -> Path:
    (folder / CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)
    return folder


REDOS = "(.*.*)*X"
BAD_LORAS = {  # name -> (change to the PEFT-saved rank-4 LoRA, the error line says)
    "rank_pattern": (lambda f: _config(f, rank_pattern={REDOS: 4}), "rank_pattern key '(.*.*)*X' is refused"),
    "alpha_pattern": (lambda f: _config(f, alpha_pattern={REDOS: 4}), "alpha_pattern key '(.*.*)*X' is refused"),
    "target_modules": (lambda f: _config(f, target_modules=REDOS), "target_modules='(.*.*)*X' is refused"),
    "nan": (_nan_bytes, "'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight' holds non-finite values"),
    "inf": (lambda f: _tensors(f, lambda t: t[sorted(t)[0]].__setitem__((0, 0), float("inf"))), "non-finite"),
    "rank": (lambda f: _config(f, r=8), "lora_A has shape (4, 64), but the config gives this module rank 8"),
    "rank_pattern_rank": (lambda f: _config(f, rank_pattern={"v_proj": 2}), "rank 2"),
    "r0": (lambda f: _config(f, r=0), "r=0 is not a whole number from 1 to 65536"),
    "rabc": (lambda f: _config(f, r="abc"), "r='abc' is not a whole number"),
    "r1e9": (lambda f: _config(f, r=1e9), "r=1000000000.0 is not a whole number"),
    "alpha_nan": (lambda f: _config(f, lora_alpha=float("nan")), "lora_alpha=nan is not a finite number"),
    "int64": (lambda f: _tensors(f, lambda t: t.update({k: v.to(torch.int64) for k, v in t.items()})),
              "is int64; adapter weights must be one of"),
    "bool": (lambda f: _tensors(f, lambda t: t.update({k: v > 0 for k, v in t.items()})), "is bool"),
    "float8": (lambda f: _tensors(f, lambda t: t.update({k: v.to(torch.float8_e4m3fn) for k, v in t.items()})),
               "is float8_e4m3fn"),
    "deep_json": (_deep_config, "malformed JSON (nested too deeply)"),
    "infinite_shape": (_infinite_shape, "not a valid safetensors file"),
    "bad_regex": (lambda f: _config(f, rank_pattern={"q_proj(": 4}), "not a valid regular expression"),
}


def _bad(technique_adapters, tmp_path: Path, name: str) -> Path:
    change, _ = BAD_LORAS[name]
    return change(shutil.copytree(technique_adapters["lora"], tmp_path / f"bad-{name}"))


@pytest.mark.parametrize("name", sorted(BAD_LORAS))
def test_push_refuses_a_bad_artifact_in_one_line(name, technique_adapters, tmp_path):
    home = tmp_path / "home"
    folder = _bad(technique_adapters, tmp_path, name)
    one_line_error(hub("push", folder, "--name", "bad", "--version", "1.0.0", home=home, ok=False), BAD_LORAS[name][1])
    assert snapshot(home) == {}


def test_push_refuses_an_ia3_feedforward_pattern_even_with_the_base_at_hand(technique_adapters, tmp_path):
    """With a base, PEFT's re.fullmatch of each module name against `(.*.*)*X` would never return."""
    folder = _config(shutil.copytree(technique_adapters["ia3"], tmp_path / "ia3"), feedforward_modules=REDOS)
    result = hub("push", folder, "--name", "bad", "--version", "1.0.0", "--base-model", technique_adapters["base"],
                 home=tmp_path / "home", ok=False)
    one_line_error(result, "feedforward_modules='(.*.*)*X' is refused as a regular expression")


def test_an_ia3_feedforward_pattern_within_bounds_is_served_as_peft_reads_it(technique_adapters, tmp_path):
    from hub.artifact import read_adapter
    from hub.checkpoint import is_feedforward

    folder = _config(shutil.copytree(technique_adapters["ia3"], tmp_path / "ia3"), feedforward_modules=r".*\.mlp\..*")
    adapter = read_adapter(folder)
    assert is_feedforward(adapter, "model.layers.0.mlp.down_proj")
    assert not is_feedforward(adapter, "model.layers.0.self_attn.k_proj")


# --- files that are not regular files ---

def test_push_refuses_a_symlink_to_a_file_outside_the_folder(technique_adapters, tmp_path):
    folder = shutil.copytree(technique_adapters["lora"], tmp_path / "linked")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the registry")
    (folder / "notes.txt").symlink_to(secret)
    home = tmp_path / "home"
    one_line_error(hub("push", folder, "--name", "l", "--version", "1.0.0", home=home, ok=False),
                   "notes.txt is a symbolic link, not a regular file")
    assert snapshot(home) == {}


def test_push_refuses_symlinked_weights(technique_adapters, tmp_path):
    folder = tmp_path / "linked"
    folder.mkdir()
    shutil.copy(technique_adapters["lora"] / CONFIG_FILE, folder)
    (folder / WEIGHTS_FILE).symlink_to(technique_adapters["lora"] / WEIGHTS_FILE)
    one_line_error(hub("push", folder, "--name", "l", "--version", "1.0.0", home=tmp_path / "home", ok=False),
                   "adapter_model.safetensors is a symbolic link")


def test_push_refuses_a_fifo_without_opening_it(technique_adapters, tmp_path):
    """Opening a FIFO for reading waits for a writer: push must refuse it by its type, never open it."""
    folder = shutil.copytree(technique_adapters["lora"], tmp_path / "fifo")
    os.mkfifo(folder / "notes.txt")
    one_line_error(hub("push", folder, "--name", "f", "--version", "1.0.0", home=tmp_path / "home", ok=False),
                   "notes.txt is a FIFO, not a regular file")


# --- pull validates what a remote holds as push does ---

def plant(registry: Registry, folder: Path, name: str, version: str = "1.0.0", path: str | None = None,
          **claims) -> None:
    """Store a folder as `name@version` with no validation at all (what a hostile or old registry holds);
    `claims` override manifest fields; `path` records the version in a folder of the registry."""
    config = parse_config((folder / CONFIG_FILE).read_bytes(), "plant")
    adapter = Adapter(technique_of(config), config, parse_tensors(read_buffer(folder / WEIGHTS_FILE), "plant"))
    files = {p.name: dict(zip(("size", "sha256"), sha256_file(p))) for p in sorted(folder.iterdir())}
    manifest = build(name, version, adapter, files, BaseModelInfo(), Provenance())
    for key, value in claims.items():
        setattr(manifest, key, value)
    manifest.sha256, manifest.path = artifact_digest(manifest.files), path
    if path is None:
        for p in folder.iterdir():
            registry.store.put(p, *sha256_file(p))
    registry.refs.add(manifest)


def _remote(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "shared")


@pytest.mark.parametrize("name", ["rank_pattern", "target_modules", "nan", "rank", "alpha_nan", "int64"])
def test_pull_refuses_what_push_refuses(name, technique_adapters, tmp_path):
    remote = _remote(tmp_path)
    plant(remote, _bad(technique_adapters, tmp_path, name), "bad")
    home = tmp_path / "home"
    one_line_error(hub("pull", "bad@1.0.0", "--from", remote.root, home=home, ok=False), BAD_LORAS[name][1])
    assert snapshot(home) == {}


def test_pull_refuses_an_artifact_holding_only_a_pickle(technique_adapters, tmp_path):
    folder = shutil.copytree(technique_adapters["lora"], tmp_path / "pickle")
    torch.save(load_file(folder / WEIGHTS_FILE), folder / "adapter_model.bin")
    (folder / WEIGHTS_FILE).unlink()
    remote = _remote(tmp_path)
    files = {p.name: dict(zip(("size", "sha256"), sha256_file(p))) for p in sorted(folder.iterdir())}
    plant(remote, technique_adapters["lora"], "pickle", files=files)  # the config and the pickle only
    remote.store.put(folder / "adapter_model.bin", *sha256_file(folder / "adapter_model.bin"))
    one_line_error(hub("pull", "pickle@1.0.0", "--from", remote.root, home=tmp_path / "home", ok=False),
                   "no adapter_model.safetensors in the version's files")


def test_pull_refuses_a_manifest_that_says_lora_over_ia3_files(technique_adapters, tmp_path):
    remote = _remote(tmp_path)
    plant(remote, technique_adapters["ia3"], "liar", technique="lora")
    one_line_error(hub("pull", "liar@1.0.0", "--from", remote.root, home=tmp_path / "home", ok=False),
                   "the manifest says technique 'lora', its files hold 'ia3'")


def test_pull_stops_reading_a_blob_past_its_declared_size(technique_adapters, tmp_path, monkeypatch):
    """A blob far larger than its manifest says is refused after reading one byte more than declared."""
    import hub.artifact as artifact

    remote = _remote(tmp_path)
    plant(remote, technique_adapters["lora"], "big")
    manifest = remote.resolve("big@1.0.0")
    blob = remote.file_path(manifest, WEIGHTS_FILE)
    declared = manifest.files[WEIGHTS_FILE]["size"]
    with open(blob, "ab") as f:
        f.truncate(declared + (64 << 20))  # 64 MiB of zeros past the declared end (sparse)
    read = []
    real = artifact.open_regular

    def counting(path):
        f = real(path)
        original = f.readinto

        def readinto(buf):
            read.append(len(buf))
            return original(buf)

        f.readinto = readinto
        return f

    monkeypatch.setattr(artifact, "open_regular", counting)
    home = tmp_path / "home"
    one_line_error(hub("pull", "big@1.0.0", "--from", remote.root, home=home, ok=False), "tampered or corrupted")
    assert max(read) == declared + 1
    assert snapshot(home) == {}


def test_pull_refuses_a_registry_path_that_leads_through_a_symlink(technique_adapters, tmp_path):
    remote = _remote(tmp_path)
    outside = shutil.copytree(technique_adapters["lora"], tmp_path / "outside")
    (remote.root / "adapters").mkdir(parents=True)
    (remote.root / "adapters" / "x").symlink_to(outside, target_is_directory=True)
    plant(remote, outside, "linked", path="adapters/x")
    one_line_error(hub("pull", "linked@1.0.0", "--from", remote.root, home=tmp_path / "home", ok=False),
                   "adapters/x is a symbolic link, not a folder")


# --- the runtime's load refuses what push refuses ---

@pytest.mark.parametrize("name, message", [
    ("rank_pattern", "rank_pattern key '(.*.*)*X' is refused"),
    ("alpha_pattern", "alpha_pattern key '(.*.*)*X' is refused"),
    ("nan", "holds non-finite values"),
    ("rank", "the config gives this module rank 8"),
])
def test_the_runtime_refuses_to_load_what_push_refuses(name, message, technique_adapters, tmp_path, served_base):
    from runtime.engine import Engine
    from runtime import errors
    from runtime.errors import ServeError
    from runtime.pool import AdapterPool

    registry = Registry(tmp_path / "registry")
    plant(registry, _bad(technique_adapters, tmp_path, name), "bad")
    registry.push(technique_adapters["lora"], "good", "1.0.0")
    pool = AdapterPool(Engine(*served_model(served_base)), registry, device_budget=1 << 30, host_budget=1 << 30)
    with pytest.raises(ServeError) as caught:
        pool.acquire([pool.resolve("bad")])
    assert isinstance(caught.value, errors.Unusable)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    pool.release(pool.acquire([pool.resolve("good")]))  # the pool goes on serving others


def test_the_server_refuses_a_pattern_that_would_freeze_it_and_keeps_answering(start_server, registry,
                                                                               technique_adapters, tmp_path):
    """Python's re holding the GIL on `(.*.*)*X` stopped Health, GetInfo and Generate alike."""
    plant(registry, _bad(technique_adapters, tmp_path, "rank_pattern"), "redos")
    _, client = start_server()
    with pytest.raises(grpc.RpcError) as caught:
        client.generate("Hello", adapters=["redos"], max_new_tokens=2)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "rank_pattern key '(.*.*)*X' is refused" in caught.value.details()
    assert client.health() == "SERVING"
    assert len(client.generate("Hello", adapters=["lora0"], max_new_tokens=2).token_ids) == 2


# --- names, versions, tags: the whole string, trailing newline included ---

@pytest.mark.parametrize("args, message", [
    (["--name", "team/bot", "--version", "1.0.0\n"], "invalid version"),
    (["--name", "team/bot\n", "--version", "1.0.0"], "invalid adapter name"),
    (["--name", "team/bot", "--version", "1.0.0-" + "a" * 65], "invalid version"),
    (["tag", "team/bot@1.0.0", "stable\n"], "invalid tag"),
])
def test_names_versions_and_tags_are_matched_whole(args, message, technique_adapters, tmp_path):
    home = tmp_path / "home"
    hub("push", technique_adapters["lora"], "--name", "team/bot", "--version", "1.0.0", home=home)
    before = snapshot(home)
    args = args if args[0] == "tag" else ["push", technique_adapters["ia3"], *args]
    one_line_error(hub(*args, home=home, ok=False), message)
    assert snapshot(home) == before


def test_a_pre_release_suffix_of_64_characters_is_a_version():
    assert check_version("1.0.0-" + "a" * 64)


def test_the_index_schema_refuses_a_trailing_newline(technique_adapters, tmp_path):
    """The JSON schema (what a remote's registry.json is checked against) agrees with the code."""
    registry = legacy_registry(tmp_path / "r")
    manifest = registry.push(technique_adapters["lora"], "team/bot", "1.0.0")
    data = json.loads((registry.root / "registry.json").read_text())
    entry = data["adapters"]["team/bot"]
    entry["versions"]["1.0.0\n"] = {**entry["versions"]["1.0.0"], "version": "1.0.0\n"}
    (registry.root / "registry.json").write_text(json.dumps(data))
    with pytest.raises(IndexCorrupt):  # a reader checks the entry it uses
        Registry(registry.root).resolve("team/bot@1.0.0")
    with pytest.raises(IndexCorrupt):
        load_manifest({**manifest.to_dict(), "name": "team/bot\n"}, "remote")


def test_a_deeply_nested_registry_json_is_one_error_line(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "registry.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line_error(hub("list", "--registry", shared, home=tmp_path / "home", ok=False), "nested too deeply")


def test_a_remote_name_with_a_trailing_newline_is_refused(tmp_path):
    one_line_error(hub("remote", "add", "shared\n", tmp_path, home=tmp_path / "home", ok=False), "invalid remote name")


def test_a_hugging_face_snapshot_link_leading_outside_its_repo_is_refused(technique_adapters, tmp_path,
                                                                          offline_hf_cache):  # noqa: F811  (the fixture imported above)
    """The cache links snapshot files to the repo's own blobs (followed); a link to anything else is refused."""
    from hub.errors import HubError
    from hub.remotes.hf import HFRemote

    storage = populate_hf_cache(offline_hf_cache, "someone/plain", technique_adapters["lora"], ["main"])
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the registry")
    snapshot = next((storage / "snapshots").iterdir())
    (snapshot / "notes.txt").symlink_to(secret)
    local = Registry(tmp_path / "home")
    with pytest.raises(HubError, match="notes.txt is a symbolic link leading outside"):
        HFRemote("someone/plain").fetch("plain@1.0.0", local, revision="main")
    (snapshot / "notes.txt").unlink()
    assert HFRemote("someone/plain").fetch("plain@1.0.0", local, revision="main").technique == "lora"


@pytest.mark.parametrize("make", [lambda p, real: p.symlink_to(real), lambda p, real: os.mkfifo(p)],
                         ids=["symlink", "fifo"])
def test_push_refuses_an_adapterhub_weights_file_that_is_a_link_or_fifo(make, tmp_path):
    """An `adapters` library folder is converted on push: its weights are read as carefully as a PEFT folder's."""
    src = Path(__file__).parent / "fixtures" / "bottleneck" / "adapters" / "houlsby"
    folder = shutil.copytree(src, tmp_path / "houlsby")
    weights = next(p for p in folder.iterdir() if p.name in ("pytorch_adapter.bin", "adapter.safetensors"))
    real = tmp_path / weights.name
    weights.rename(real)
    make(weights, real)
    one_line_error(hub("push", folder, "--name", "h", "--version", "1.0.0", home=tmp_path / "home", ok=False),
                   f"{weights.name} is a")


@pytest.mark.slow  # writes and reads a file of very many tensors
def test_a_safetensors_file_with_too_many_tensors_is_refused_before_parsing_them():
    """500k tensors cost seconds of parsing per load; past MAX_TENSORS the file is refused in one line."""
    from hub.artifact import MAX_TENSORS

    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS + 1)}
    raw = json.dumps(header).encode()
    with pytest.raises(ArtifactError, match=f"{MAX_TENSORS + 1} tensors, more than {MAX_TENSORS}"):
        parse_tensors(len(raw).to_bytes(8, "little") + raw, "big.safetensors")
    raw = b" " * ((16 << 20) + 1)
    with pytest.raises(ArtifactError, match="more than 16777216"):
        parse_tensors(len(raw).to_bytes(8, "little") + raw, "big.safetensors")
