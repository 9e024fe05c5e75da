"""Manifests (one per adapter version) and the naming rules for names, versions, tags and references.

A manifest records what the runtime and users need to trust an artifact without opening it:
technique, base model (id, revision, fingerprint), target modules, hyper-parameters, parameter
count, dtype, provenance (description, tags, license, created, lineage) and every file's size and
sha256. `sha256` is the artifact's content digest: a hash over its file names and file hashes,
so the same files give the same digest whatever the name, version or push time.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hub.artifact import Adapter, ArtifactError, Technique
from hub.errors import InvalidName
from hub.files import check_regular, open_regular

# Matched with fullmatch (`$` would let a final newline through: `1.0.0\n` beside `1.0.0`); the JSON schema
# (hub/registry.schema.json) says the same with `$(?!\n)`.
_SEGMENT = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,62}[A-Za-z0-9])?"
NAME_RE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})?")
_NUMBER = r"(0|[1-9][0-9]{0,19})"
MAX_PRERELEASE = 64  # characters of a pre-release suffix (`1.0.0-<suffix>`)
VERSION_RE = re.compile(rf"{_NUMBER}\.{_NUMBER}\.{_NUMBER}"
                        rf"(?:-(?=[0-9A-Za-z.-]{{1,{MAX_PRERELEASE}}}\Z)([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?")
TAG_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

# Config keys worth showing per technique ("rank/alpha or size"); copied as saved when present.
_HYPERPARAMS: dict[Technique, tuple[str, ...]] = {
    Technique.LORA: ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "lora_bias", "fan_in_fan_out"),
    Technique.IA3: ("feedforward_modules", "fan_in_fan_out"),
    Technique.PROMPT_TUNING: ("num_virtual_tokens", "token_dim", "num_transformer_submodules"),
    Technique.BITFIT: (),
    Technique.BOTTLENECK: ("locations", "bottleneck_size", "reduction_factor", "non_linearity"),
}


_UNSET: tuple[Any, ...] = (None, False, {}, [])  # defaults not worth listing


def check_name(name: str) -> str:
    """An adapter name, optionally `org/name`; refuses anything that could escape the store."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"invalid adapter name {name!r}: use letters, digits, '.', '_', '-', optionally one 'org/' "
            "namespace; no '..', no leading '/' or other characters"
        )
    return name


def check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise InvalidName(f"invalid version {version!r}: use semantic versioning, e.g. 1.2.0 or 1.2.0-rc.1 "
                          f"(numbers of at most 20 digits, a pre-release suffix of at most {MAX_PRERELEASE} characters)")
    return version


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag):
        raise InvalidName(f"invalid tag {tag!r}: start with a letter; letters, digits, '.', '_', '-' (at most 64)")
    return tag


def check_filename(filename: str) -> str:
    if not isinstance(filename, str) or not FILE_RE.fullmatch(filename) or ".." in filename:
        raise InvalidName(f"invalid artifact file name {filename!r}")
    return filename


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`name`, `name@1.2.0` or `name@tag` -> (name, version, tag); at most one of the last two is set."""
    name, sep, selector = ref.partition("@")
    check_name(name)
    if not sep:
        return name, None, None
    if selector[:1].isdigit():
        return name, check_version(selector), None
    return name, None, check_tag(selector)


def version_key(version: str) -> tuple:
    """Semantic-versioning precedence: 1.10.0 > 1.9.0, and a pre-release sorts before its release."""
    m = VERSION_RE.fullmatch(version)
    if m is None:
        raise InvalidName(f"invalid version {version!r}")
    major, minor, patch, pre = m.groups()
    pre_key = () if pre is None else tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return int(major), int(minor), int(patch), pre is None, pre_key


def artifact_digest(files: dict[str, dict[str, Any]]) -> str:
    """The content digest of an artifact: sha256 over its sorted file names and file hashes."""
    listing = {name: files[name]["sha256"] for name in sorted(files)}
    return hashlib.sha256(json.dumps(listing, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, streamed."""
    h = hashlib.sha256()
    size = 0
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def artifact_files(folder: Path) -> list[Path]:
    """The files of an artifact folder: its top-level regular files (dot files, e.g. .gitattributes, excluded).
    A symbolic link, FIFO or device is refused (NotRegularFile): it is never followed or opened."""
    files = []
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() and not p.is_symlink():
            raise ArtifactError(
                f"{folder}: holds a sub-folder {p.name!r}; an artifact is one flat folder "
                "(PEFT saves a non-default adapter in a sub-folder: push that folder)"
            )
        check_filename(p.name)
        check_regular(p)
        files.append(p)
    return files


@dataclass(frozen=True)
class BaseModelInfo:
    """The base model an adapter was pushed against; `fingerprint` is None when the base was not at hand."""

    id: str | None = None
    revision: str | None = None
    fingerprint: str | None = None


@dataclass
class Manifest:
    name: str
    version: str
    technique: str
    base_model: BaseModelInfo
    target_modules: list[str]
    hyperparams: dict[str, Any]
    params: int
    dtype: str
    description: str
    tags: list[str]
    license: str | None
    created: str
    lineage: dict[str, Any]
    files: dict[str, dict[str, Any]]  # file name -> {"size": int, "sha256": hex}
    sha256: str
    # Set only for versions whose files sit in a folder of the registry (e.g. the repo's demo adapters),
    # relative to the registry root; otherwise the files are content-addressed blobs.
    path: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["path"] is None:
            del data["path"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """A manifest of its own: nothing in it is shared with `data` (e.g. the index readers share)."""
        fields = copy.deepcopy(data)
        fields["base_model"] = BaseModelInfo(**fields["base_model"])
        fields.setdefault("path", None)
        return cls(**fields)

    def renamed(self, name: str, version: str) -> Manifest:
        """The same artifact recorded under another name/version (e.g. pulled from a plain HF repo)."""
        return Manifest.from_dict({**self.to_dict(), "name": check_name(name), "version": check_version(version)})


@dataclass
class Provenance:
    """What the pusher says about an artifact (everything else is read from the files)."""

    description: str = ""
    tags: tuple[str, ...] = ()
    license: str | None = None
    lineage: dict[str, Any] = field(default_factory=lambda: {"parents": []})


def target_modules(adapter: Adapter) -> list[str]:
    """The module names an adapter touches (e.g. `q_proj`; bottleneck: `ffn_adapter`), as the engine maps them."""
    from hub.checkpoint import module_tensors

    names: set[str] = set()
    for path, tensors in module_tensors(adapter).items():
        if adapter.technique is Technique.BOTTLENECK:
            names.update(name.split(".", 1)[0] for name in tensors)
        elif path:
            names.add(path.rsplit(".", 1)[-1])
    return sorted(names)


def _dtypes(adapter: Adapter) -> str:
    return ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in adapter.tensors.values()}))


def check_claims(manifest: Manifest, adapter: Adapter) -> None:
    """ArtifactError unless a manifest from elsewhere (a remote) says what its files hold, as `build` would."""
    claims = {"technique": (manifest.technique, adapter.technique.value),
              "target_modules": (manifest.target_modules, target_modules(adapter)),
              "params": (manifest.params, adapter.num_parameters), "dtype": (manifest.dtype, _dtypes(adapter))}
    for key, (claimed, held) in claims.items():
        if claimed != held:
            raise ArtifactError(f"{manifest.ref}: the manifest says {key} {claimed!r}, its files hold {held!r}")


def build(
    name: str, version: str, adapter: Adapter, files: dict[str, dict[str, Any]], base: BaseModelInfo,
    provenance: Provenance,
) -> Manifest:
    """The manifest of an artifact read from disk (`files` as hashed by `sha256_file`)."""
    technique = adapter.technique
    return Manifest(
        name=check_name(name),
        version=check_version(version),
        technique=technique.value,
        base_model=base,
        target_modules=target_modules(adapter),
        hyperparams={k: adapter.config[k] for k in _HYPERPARAMS[technique] if adapter.config.get(k) not in _UNSET},
        params=adapter.num_parameters,
        dtype=_dtypes(adapter),
        description=provenance.description,
        tags=sorted(set(provenance.tags)),
        license=provenance.license,
        created=datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        lineage=provenance.lineage,
        files=files,
        sha256=artifact_digest(files),
    )
