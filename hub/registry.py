"""The registry facade: push, resolve, materialize, export, tag, remove, verify, gc and migrate.

A registry is a directory: its index, one small file per version and per adapter's tags under `refs/`
(hub/refs.py), and content-addressed blobs (hub/store.py). A folder whose index is one `registry.json`
(hub/index.py: written before refs/ existed, or the listing a repository ships) is read and written as
it is until `migrate` converts it. A push validates the artifact and, when the base model is at hand,
that it fits the base; it writes the blobs first and then adds the version to the index in one atomic
rename, so a push killed at any moment leaves the old index and, at worst, unreferenced blobs that `gc`
removes. A version can instead live in a folder of the registry (`path`, relative to the root): that is
how a git checkout ships its demo adapters in its own `registry.json`.
"""
from __future__ import annotations

import builtins
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub import base_layout, basemodel, evals
from hub.artifact import (CONFIG_FILE, WEIGHTS_FILE, Adapter, ArtifactError, Technique, adapter_from_bytes,
                          is_adapterhub_folder, read_adapter, read_buffer)
from hub.chat_template import chat_template, check_template
from hub.errors import Conflict, HubError, IntegrityError, InvalidName, NotFound
from hub.files import NotRegularFile, check_below
from hub.home import hub_home
from hub.index import Index, JsonStore
from hub.manifest import (
    BaseModelInfo, Manifest, Provenance, artifact_files, build, check_claims, check_name, check_version, parse_ref,
    sha256_file,
)
from hub.refs import RefStore, is_legacy, listing, migrate
from hub.store import BlobStore, Progress, check_copy, copy_hashed, fsync_dir, new_folder, temp_name

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor


@functools.cache
def _hashing() -> ThreadPoolExecutor:
    """The threads read_deferred hashes in, made on first use: a command that reads no adapter pays no import."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="hub-sha256")

CHECKOUTS = "checkouts"


@dataclass
class GcReport:
    blobs: int = 0
    bytes: int = 0
    checkouts: int = 0
    temps: int = 0
    records: int = 0  # records files of versions no longer there (a removal cut short)


def _base_config(base_id: str) -> Any | None:
    """The transformers config of a base model if it is at hand (embedded, local folder or cached); else None."""
    from transformers import AutoConfig

    base_id = basemodel.embedded_name(base_id)
    try:
        if base_id in basemodel.EMBEDDED or Path(base_id).expanduser().is_dir():
            return AutoConfig.from_pretrained(basemodel.resolve(base_id))
        return AutoConfig.from_pretrained(base_id, local_files_only=True)
    except (OSError, ValueError, basemodel.BaseModelError):
        return None


def _base_layout(base_id: str) -> base_layout.ConfigLayout | None:
    """The base's module shapes from its config.json where hub.base_layout reads them (found as `_base_config`
    finds the config), which spares a push the import of transformers and torch; else None."""
    base_id = basemodel.embedded_name(base_id)
    prepared = basemodel.prepared_file(base_id, base_layout.CONFIG_FILE) if base_id in basemodel.EMBEDDED else None
    if prepared is not None:  # its config alone, checked (the weights are not read)
        return base_layout.read(prepared)
    try:
        if base_id in basemodel.EMBEDDED or Path(base_id).expanduser().is_dir():
            return base_layout.read(basemodel.resolve(base_id))
    except basemodel.BaseModelError:
        return None
    return base_layout.cached(base_id)


def check_base(adapter: Adapter, base_model: str | None) -> BaseModelInfo:
    """Check the adapter against its base model (when at hand) and return what the manifest records.

    Raises ArtifactError naming the first module that is missing or has the wrong shape."""
    base_id = base_model or adapter.config.get("base_model_name_or_path")
    if not base_id:
        return BaseModelInfo()
    revision = adapter.config.get("revision")
    recorded = basemodel.canonical_id(base_id)
    config = _base_layout(base_id) or _base_config(base_id)
    if config is None:
        # A named base not at hand is recorded unchecked, but a bare name close to an embedded one is a typo.
        hint = basemodel.did_you_mean(base_model, hf_ids=False) if base_model and "/" not in base_model else ""
        if hint:
            raise InvalidName(f"unknown base model {base_model!r}{hint}")
        return BaseModelInfo(id=recorded, revision=revision)
    from hub.checkpoint import fitted_fingerprint

    try:
        try:
            fitted = fitted_fingerprint(adapter, config)
        except base_layout.Unmapped:  # a module the config's layout does not list: transformers' model answers
            whole = _base_config(base_id)
            assert whole is not None, "a base whose config.json gave a layout has a transformers config"
            fitted = fitted_fingerprint(adapter, whole)
    except ArtifactError as e:
        raise ArtifactError(f"does not fit base model {base_id}: {e}") from None
    return BaseModelInfo(id=recorded, revision=revision, fingerprint=fitted)


def _missing(manifest: Manifest, name: str, path: Path) -> IntegrityError:
    return IntegrityError(f"{manifest.ref}: file {name} is missing ({path})")


def _check_same_metadata(existing: Manifest, manifest: Manifest) -> None:
    """Refuse a re-push of a version's files with other metadata: versions are immutable, and taking it
    as a no-op would drop the new description (or base, tags, license) without a word."""
    old, new = existing.to_dict(), manifest.to_dict()
    differ = [k for k in new if k != "created" and old.get(k) != new.get(k)]
    if differ:
        raise Conflict(f"{existing.ref} already exists with the same files but a different {', '.join(differ)}; "
                       "versions are immutable: push a new version")


def _size_and_digest(data: bytes | bytearray) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


def _read_deferred(manifest: Manifest, locate: Callable[[str], Path],
                   shapes_only: bool = False) -> tuple[Adapter, Callable[[], None]]:
    """Registry.read_deferred for files wherever `locate` finds them; a file is read only up to one byte past
    its recorded size, so an oversized one is refused without reading it all. `shapes_only`: as
    hub.artifact.read_adapter takes it."""
    data, pending = {}, {}
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if name not in manifest.files:
            raise ArtifactError(f"{manifest.ref}: no {name} in the version's files")
        path = locate(name)
        try:
            data[name] = read_buffer(path, limit=int(manifest.files[name]["size"]))
        except FileNotFoundError:
            raise _missing(manifest, name, path) from None
        pending[name] = _hashing().submit(_size_and_digest, data[name])

    def verified() -> None:
        for name, future in pending.items():
            info = manifest.files[name]
            check_copy(f"{manifest.ref}: {name}", future.result(), info["size"], info["sha256"])

    try:
        adapter = adapter_from_bytes(data[CONFIG_FILE], data[WEIGHTS_FILE], manifest.ref, shapes_only=shapes_only)
    except ArtifactError:
        verified()  # damaged bytes are an IntegrityError, not a malformed adapter
        raise
    return adapter, verified


def _check_incoming(manifest: Manifest, sources: dict[str, Path]) -> None:
    """Refuse a version from elsewhere unless push would take its files and its manifest says what they hold:
    the config and safetensors weights read (bounded by their recorded sizes) and checked by sha256, every
    check of `hub.artifact` (config, patterns, dtypes, finite values, ranks), then the manifest's claims; torch is
    never imported."""
    adapter, verified = _read_deferred(manifest, sources.__getitem__, shapes_only=True)
    verified()
    check_claims(manifest, adapter)


@contextmanager
def _imported(folder: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The folder to push, converting an AdapterHub `adapters` library folder first; yields (folder, lineage
    additions). The importer is imported only for such a folder: it loads torch, which a push never needs."""
    if is_adapterhub_folder(folder):
        from hub.adapterhub_import import import_adapterhub

        with tempfile.TemporaryDirectory(prefix="hub-import-") as tmp:
            import_adapterhub(folder, Path(tmp))
            yield Path(tmp), {"imported_from": "adapterhub"}
        return
    yield folder, {}


class Registry:
    """A registry directory (default: `$HUB_HOME`)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else hub_home()
        self.store = BlobStore(self.root)
        self._refs = self._open_refs()

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    @property
    def refs(self) -> RefStore | JsonStore:
        """Where the index lives: `refs/` (every new registry), or `registry.json` where that is all the root
        holds (until `migrate`; a registry opened before a migration follows it)."""
        if isinstance(self._refs, JsonStore) and not is_legacy(self.root):
            self._refs = self._open_refs()
        return self._refs

    def _open_refs(self) -> RefStore | JsonStore:
        return JsonStore(self.root) if is_legacy(self.root) else RefStore(self.root)

    # -- reading

    def index(self) -> Index | RefStore:
        """The index to read: names, versions, tags, get, resolve, manifests."""
        return self.refs.reader()

    def manifests(self) -> list[Manifest]:
        return list(self.index().manifests())

    def resolve(self, ref: str) -> Manifest:
        return self.index().resolve(ref)

    def tags(self, name: str) -> dict[str, str]:
        return self.index().tags(name)

    def list(self, *, base_model: str | None = None, technique: str | None = None, name: str | None = None,
             tag: str | None = None, text: str | None = None, limit: int | None = None) -> list[Manifest]:
        """Versions in name and version order, filtered: pushed against one base model, of one technique,
        named with a prefix, carrying a tag (a tag pointing at it or a descriptive one), or containing `text`
        (case-insensitive) in the name, description or a descriptive tag; the first `limit` of them.

        Only the entries of the names that match the prefix are read, and reading stops at `limit`."""
        known = [t.value for t in Technique]
        if technique is not None and technique not in known:  # a typo would list nothing, silently
            raise InvalidName(f"unknown technique {technique!r}; one of: {', '.join(known)}")
        if limit is not None and limit < 1:
            raise InvalidName(f"--limit must be at least 1, not {limit}")
        bases = None
        if base_model:  # as named, as the id push records for it, or as a folder an older push recorded
            bases = {base_model, basemodel.canonical_id(base_model), str(Path(base_model).expanduser().resolve())}
        index = self.index()
        needle = text.casefold() if text is not None else None

        def wanted(m: Manifest) -> bool:
            return ((bases is None or m.base_model.id in bases) and (technique is None or m.technique == technique)
                    and (tag is None or tag in m.tags or index.tags(m.name).get(tag) == m.version)
                    and (needle is None or any(needle in s.casefold() for s in (m.name, m.description, *m.tags))))

        return list(islice(filter(wanted, index.manifests(index.names(name))), limit))

    def file_path(self, manifest: Manifest, filename: str) -> Path:
        """Where one file of a version lies: its blob, or its registry folder for `path` versions."""
        if manifest.path is not None:  # a folder named by the index: it may not lead through links
            return check_below(self.root, self.root / manifest.path / filename)
        return self.store.path(manifest.files[filename]["sha256"])

    # -- adding versions

    def push(
        self, folder: str | Path, name: str, version: str, *, base_model: str | None = None, description: str = "",
        tags: tuple[str, ...] | builtins.list[str] = (), license: str | None = None,
        lineage: dict[str, Any] | None = None, in_place: bool = False, progress: Progress | None = None,
    ) -> Manifest:
        """Validate an adapter folder and add it as `name@version`. The same content again is a no-op;
        `in_place` records a folder inside this registry by relative path instead of copying it to blobs."""
        check_name(name)
        check_version(version)
        folder = Path(folder)
        if not folder.is_dir():
            raise ArtifactError(f"{folder}: not a folder")
        with _imported(folder) as (src, imported):
            if in_place and src != folder:
                raise HubError("an AdapterHub folder is converted on push, so it cannot be recorded in place")
            adapter = read_adapter(src, shapes_only=True)  # a push reads shapes and checks values: no torch
            base = check_base(adapter, base_model)
            files = {}
            for p in artifact_files(src):
                size, digest = sha256_file(p)
                files[p.name] = {"size": size, "sha256": digest}
            template = chat_template(set(files), lambda n: (src / n).read_bytes())
            if template is not None:  # refused now, not by every chat request that names the adapter
                check_template(template)
            provenance = Provenance(description, tuple(tags), license, {"parents": [], **(lineage or {}), **imported})
            manifest = build(name, version, adapter, files, base, provenance)
            if in_place:
                manifest.path = self._relative(folder)
            existing = self.index().get(name, version)
            if existing is not None and existing.sha256 == manifest.sha256:
                _check_same_metadata(existing, manifest)
            return self._commit(manifest, {n: src / n for n in manifest.files}, progress)

    def _relative(self, folder: Path) -> str:
        try:
            rel = folder.resolve().relative_to(self.root.resolve())
        except ValueError:
            raise HubError(f"{folder} is not inside the registry {self.root}: it cannot be recorded in place") from None
        return rel.as_posix()

    def add_files(self, folder: Path, manifest: Manifest, progress: Progress | None = None) -> Manifest:
        """Add a version from elsewhere (e.g. downloaded) whose files lie in `folder`: validated as a push
        validates them (`_check_incoming`), each file checked against the manifest's size and sha256."""
        sources = {name: Path(folder) / name for name in manifest.files}
        _check_incoming(manifest, sources)
        return self._commit(manifest, sources, progress)

    def add_from(self, source: Registry, ref: str, progress: Progress | None = None) -> Manifest:
        """Copy one version from another registry (pull from / push to a directory remote), validated as a
        push validates it and verifying every file."""
        manifest = source.resolve(ref)
        sources = {name: source.file_path(manifest, name) for name in manifest.files}
        _check_incoming(manifest, sources)
        manifest.path = None
        return self._commit(manifest, sources, progress)

    def _commit(self, manifest: Manifest, sources: dict[str, Path], progress: Progress | None) -> Manifest:
        """Add a version from `sources`; the same version again re-fetches those of its blobs that are damaged."""
        existing = self.index().get(manifest.name, manifest.version)
        if existing is not None:
            if existing.sha256 == manifest.sha256 and existing.path is None:
                self._put_blobs(existing, sources, progress, [])  # intact blobs are kept, damaged ones replaced
            return self.refs.add(manifest)  # the no-op, or Conflict before any byte is written
        created: list[str] = []
        evals.discard(self.root, manifest.name, manifest.version)  # a removed version's, left by a crash: not this one's

        def blobs_again() -> None:  # under the registry lock: a concurrent gc may have taken some
            if manifest.path is None:
                self._put_blobs(manifest, sources, None, created, trust_existing=True)

        try:
            if manifest.path is None:
                self._put_blobs(manifest, sources, progress, created)
            else:
                self._check_files(manifest)
            return self.refs.add(manifest, blobs_again)
        except BaseException:
            self._drop_unreferenced(created)
            raise

    def _put_blobs(self, manifest: Manifest, sources: dict[str, Path], progress: Progress | None,
                   created: builtins.list[str], trust_existing: bool = False) -> None:
        """Store every file as a blob, appending to `created` the digests this call wrote (to undo on failure)."""
        for name, info in manifest.files.items():
            try:  # a source is read only for a blob that is not here intact
                written = self.store.put(sources[name], info["size"], info["sha256"], progress,
                                         trust_existing=trust_existing)
            except FileNotFoundError:
                raise _missing(manifest, name, sources[name]) from None
            if written:
                created.append(info["sha256"])

    @staticmethod
    def _referenced_blobs(manifests: Iterable[Manifest]) -> set[str]:
        """Digests of the blobs these versions store in the blob store (not those in a `path` folder)."""
        return {f["sha256"] for m in manifests if m.path is None for f in m.files.values()}

    def _drop_unreferenced(self, digests: builtins.list[str]) -> None:
        """Undo a failed add: remove the blobs it wrote that no version refers to."""
        if not digests:
            return
        with self.refs.locked():
            referenced = self._referenced_blobs(self.index().manifests())
            for digest in digests:
                if digest not in referenced and self.store.has(digest):
                    self.store.delete(digest)

    def discard(self, manifest: Manifest) -> None:
        """Undo an add (e.g. `push --to` whose remote failed): remove the version, and its blobs and
        checkout unless another version shares them."""
        if self.index().get(manifest.name, manifest.version) is not None:
            self.refs.remove(manifest.name, manifest.version)
        self._drop_unreferenced([f["sha256"] for f in manifest.files.values()])
        checkout = self.root / CHECKOUTS / manifest.sha256
        if checkout.is_dir() and manifest.sha256 not in {m.sha256 for m in self.index().manifests()}:
            shutil.rmtree(checkout)

    # -- using versions

    def materialize(self, manifest: Manifest) -> Path:
        """A folder holding the version's files (what `read_adapter` takes), checked against the manifest."""
        if manifest.path is not None:
            self._check_files(manifest)
            return self.root / manifest.path
        target = self.root / CHECKOUTS / manifest.sha256
        if target.is_dir() and not self._problems(manifest, lambda name: target / name):
            return target
        tmp = temp_name(self.store.tmp)
        tmp.mkdir()
        try:
            self._copy_files(manifest, self.file_path, tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)  # a damaged checkout: it is only a cache of the blobs
            try:
                os.replace(tmp, target)
            except OSError:
                if not target.is_dir():  # else another process materialized it first
                    raise
            fsync_dir(target.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def read(self, manifest: Manifest) -> Adapter:
        """The version as an Adapter, straight from its stored files: each read once, checked against the
        manifest's size and sha256 in memory, then parsed (no checkout written). IntegrityError for a
        missing or damaged file, ArtifactError for one that is not an adapter."""
        adapter, verified = self.read_deferred(manifest)
        verified()
        return adapter

    def read_deferred(self, manifest: Manifest) -> tuple[Adapter, Callable[[], None]]:
        """`read`, with the weights' sha256 computed in another thread while the caller goes on: returns the
        adapter (parsed, not yet trusted) and `verified()`, which waits for the hash and raises IntegrityError
        if the bytes are not the manifest's. A server's cold load prepares the adapter meanwhile (hashlib
        releases the GIL) and calls `verified()` before serving it."""
        return _read_deferred(manifest, lambda name: self.file_path(manifest, name))

    def _copy_files(self, manifest: Manifest, source, dst: Path) -> None:
        for name, info in manifest.files.items():
            src = source(manifest, name)
            if not src.is_file():
                raise _missing(manifest, name, src)
            check_copy(f"{manifest.ref}: {name}", copy_hashed(src, dst / name, limit=info["size"]), info["size"],
                       info["sha256"])

    def export(self, ref: str, out: str | Path) -> Path:
        """Write a version's files to a new folder `out` (PEFT's `from_pretrained` loads PEFT techniques)."""
        with new_folder(Path(out)) as tmp:
            manifest = self.resolve(ref)
            self._copy_files(manifest, self.file_path, tmp)  # from the blobs, each checked by sha256
        return Path(out)

    # -- changing names

    def tag(self, ref: str, tag: str) -> Manifest:
        """Point `name@tag` at the version `ref` resolves to (moving the tag if it exists)."""
        manifest = self.resolve(ref)
        self.refs.set_tag(manifest.name, tag, manifest.version)
        return manifest

    def untag(self, ref: str) -> Manifest:
        """Delete the tag `name@tag` alone; returns the version it pointed at."""
        name, _, tag = parse_ref(ref)
        if tag is None:
            raise InvalidName(f"give the tag to delete, e.g. {name}@stable")
        version = self.refs.delete_tag(name, tag)
        manifest = self.index().get(name, version)
        if manifest is None:
            raise NotFound(f"{name}@{tag} pointed at {version}, which is gone")
        return manifest

    def version_tags(self, manifest: Manifest) -> builtins.list[str]:
        """The tags that point at this version."""
        return sorted(t for t, v in self.tags(manifest.name).items() if v == manifest.version)

    def remove(self, ref: str) -> tuple[Manifest, builtins.list[str]]:
        """Remove one version and the tags that point at it; returns both. Its blobs are freed by the next gc.

        The version must be named: removing through a tag would take the version and its other tags
        along when the tag alone may have been meant."""
        name, version, tag = parse_ref(ref)
        manifest = self.resolve(ref)
        if version is None:
            tags = self.version_tags(manifest)
            also = f" (and its tags: {', '.join(tags)})" if tags else ""
            raise InvalidName(
                f"give the version to remove: `hub rm {manifest.ref}` removes it{also}"
                + (f"; `hub untag {ref}` deletes the tag alone" if tag else ""))
        tags = self.refs.remove(manifest.name, manifest.version)
        evals.discard(self.root, manifest.name, manifest.version)  # after the removal: a crash between leaves gc a file
        return manifest, tags

    # -- maintenance

    def _problems(self, manifest: Manifest, locate: Callable[[str], Path]) -> builtins.list[str]:
        problems = []
        for name, info in sorted(manifest.files.items()):
            try:
                path = locate(name)
                if not path.is_file():
                    problems.append(f"{manifest.ref}: {name} is missing ({path})")
                elif sha256_file(path) != (info["size"], info["sha256"]):
                    problems.append(f"{manifest.ref}: {name} does not match its sha256 ({path})")
            except (NotRegularFile, FileNotFoundError) as e:
                problems.append(f"{manifest.ref}: {name}: {e}")
        return problems

    def _check_files(self, manifest: Manifest) -> None:
        problems = self._problems(manifest, lambda name: self.file_path(manifest, name))
        if problems:
            raise IntegrityError(problems[0])

    def verify(self, ref: str | None = None) -> tuple[int, builtins.list[str]]:
        """Re-hash every file of one version (or of all); returns (files checked, problems)."""
        manifests = [self.resolve(ref)] if ref else self.manifests()
        return sum(len(m.files) for m in manifests), [p for _, found in self.damaged(manifests) for p in found]

    def damaged(self, manifests: builtins.list[Manifest]) -> builtins.list[tuple[Manifest, builtins.list[str]]]:
        """The versions among `manifests` with a missing or damaged file, each with its problems."""
        found = [(m, self._problems(m, functools.partial(self.file_path, m))) for m in manifests]
        return [(m, problems) for m, problems in found if problems]

    def gc(self) -> GcReport:
        """Remove blobs and checkouts no version refers to, and temp files of processes that are gone."""
        report = GcReport()
        with self.refs.locked():
            manifests = self.manifests()
            referenced = self._referenced_blobs(manifests)
            for digest in list(self.store.stored()):
                if digest not in referenced:
                    report.bytes += self.store.delete(digest)
                    report.blobs += 1
            digests = {m.sha256 for m in manifests}
            checkouts = self.root / CHECKOUTS
            if checkouts.is_dir():
                for folder in checkouts.iterdir():
                    if folder.name not in digests:
                        shutil.rmtree(folder)
                        report.checkouts += 1
            report.temps = self.store.clean_tmp()
            for name, version in evals.orphans(self.root, {(m.name, m.version) for m in manifests}):
                report.records += evals.discard(self.root, name, version)
        return report

    def migrate(self) -> int:
        """Convert a `registry.json` registry to the refs/ layout, atomically (hub.refs.migrate); returns
        the number of versions."""
        count = migrate(self.root)
        self._refs = self._open_refs()
        return count

    def listing(self) -> dict[str, Any]:
        """Every version and tag as one `registry.json` document (hub/registry.schema.json), checked."""
        index = self.index()
        return listing(index.manifests(), index.tags)


def open_registry(root: str | Path | None) -> Registry:
    """The registry at `root` (default `$HUB_HOME`); a missing root is refused unless it is the default."""
    if root is not None and not Path(root).is_dir():
        raise NotFound(f"no registry folder {root}")
    return Registry(root)

