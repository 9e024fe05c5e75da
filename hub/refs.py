"""The registry's index at scale: one small file per version and one per adapter's tags, as git keeps refs
and OCI registries keep manifests.

    refs/<org>/<name>/versions/<version>.json   one version's manifest: written once, never changed
    refs/<org>/<name>/tags.json                 {tag: version}, replaced whole
    refs/<org>/<name>/.lock                     the adapter's writer lock
    (`_` stands for <org> when a name has none: no name segment starts with `_`)

A push, tag or removal touches the files of one adapter, so its cost does not grow with the registry, and a
lookup reads only the files of the adapter it names. Every file is written to the registry's temp folder,
fsynced and renamed into place: nothing is rewritten in place and no database is involved, so the layout is
safe on a shared network folder, a reader never sees half a file, and a writer killed at any moment leaves
the old state or the new one. Writers of one adapter take its lock; a push also holds the registry lock (the
one `gc` takes) while it checks its blobs are there and writes its version file, so gc cannot take the blobs
of a version being added. Each manifest is validated when written and when read; `hub verify` reads all.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from hub.errors import HubError, IndexCorrupt, InvalidName, NotFound
from hub.index import (INDEX_FILE, SCHEMA_VERSION, IndexFile, already_there, atomic_write_json, check_index,
                       load_manifest, read_json, registry_lock)
from hub.manifest import Manifest, check_name, check_tag, check_version, parse_ref, version_key
from hub.store import TMP_DIR, fsync_dir, pause_point, temp_name

REFS_DIR = "refs"
VERSIONS_DIR = "versions"
TAGS_FILE = "tags.json"
NO_ORG = "_"
MIGRATED_SUFFIX = ".migrated"
_CACHE_LIMIT = 4096  # manifests kept parsed per store (a server resolves the same few on every request)


def _text(data: Any) -> str:
    return json.dumps(data, indent=1, sort_keys=True)


class RefStore:
    """The `refs/` index of a registry root: reads (the same calls as `hub.index.Index`) and locked writes."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.refs = self.root / REFS_DIR
        self.tmp = self.root / TMP_DIR
        # version file -> ((inode, mtime, size), its manifest as validated): a version file is replaced only by
        # removing the version and pushing it anew, which is a new inode
        self._parsed: dict[Path, tuple[tuple[int, int, int], dict[str, Any]]] = {}

    def _folder(self, name: str) -> Path:
        org, _, base = check_name(name).rpartition("/")
        return self.refs / (org or NO_ORG) / base

    def _version_file(self, name: str, version: str) -> Path:
        return self._folder(name) / VERSIONS_DIR / f"{check_version(version)}.json"

    # -- reading

    def reader(self) -> RefStore:
        """What reads the index (this store itself: it reads files as asked, so it never goes stale)."""
        return self

    def names(self, prefix: str | None = None) -> list[str]:
        """Adapter names (starting with `prefix`), sorted; with an `org/` prefix only that org's folder is read."""
        if prefix and "/" in prefix:
            orgs = [prefix.split("/", 1)[0]]
        else:  # names without an org, and the orgs the prefix may start
            orgs = [o for o in _entries(self.refs) if not prefix or o == NO_ORG or o.startswith(prefix)]
        found = []
        for org in orgs:
            for base in _entries(self.refs / org):
                name = base if org == NO_ORG else f"{org}/{base}"
                if prefix is None or name.startswith(prefix):
                    found.append(_checked(check_name, name, self.refs / org / base))
        return sorted(found)

    def versions(self, name: str) -> list[str]:
        """Versions of an adapter, oldest first (semantic-versioning order)."""
        folder = self._folder(name) / VERSIONS_DIR
        found = [f.removesuffix(".json") for f in _entries(folder) if f.endswith(".json")]
        return sorted((_checked(check_version, v, folder / f"{v}.json") for v in found), key=version_key)

    def tags(self, name: str) -> dict[str, str]:
        path = self._folder(name) / TAGS_FILE
        data = _read_json(path)
        if data is None:
            return {}
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise IndexCorrupt(f"{path}: expected an object of tag -> version")
        for tag, version in data.items():
            _checked(check_tag, tag, path)
            _checked(check_version, version, path)
        return data

    def get(self, name: str, version: str) -> Manifest | None:
        path = self._version_file(name, version)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._parsed.get(path)
        if cached is None or cached[0] != identity:
            data = _read_json(path)
            if data is None:  # removed since the stat
                return None
            manifest = load_manifest(data, str(path))
            if (manifest.name, manifest.version) != (name, version):
                raise IndexCorrupt(f"{path}: holds a manifest of {manifest.name}@{manifest.version}")
            if len(self._parsed) >= _CACHE_LIMIT:
                self._parsed.clear()
            self._parsed[path] = cached = (identity, data)
        return Manifest.from_dict(cached[1])  # a copy: callers may change theirs

    def resolve(self, ref: str) -> Manifest:
        """`name` (latest version), `name@1.2.0` or `name@tag` -> its manifest, reading that adapter's files only."""
        name, version, tag = parse_ref(ref)
        versions = None
        if tag is not None:
            tags = self.tags(name)
            if tag not in tags:
                if not self.versions(name):
                    raise NotFound(f"no adapter named {name!r}")
                raise NotFound(f"{name} has no tag {tag!r} (tags: {', '.join(sorted(tags)) or 'none'})")
            version = tags[tag]
        elif version is None:
            versions = self.versions(name)
            if not versions:
                raise NotFound(f"no adapter named {name!r}")
            version = versions[-1]
        manifest = self.get(name, version)
        if manifest is not None:
            return manifest
        versions = self.versions(name)
        if tag is not None:
            raise IndexCorrupt(f"{self._folder(name) / TAGS_FILE}: tag {name}@{tag} points at missing version {version}")
        if not versions:
            raise NotFound(f"no adapter named {name!r}")
        raise NotFound(f"{name} has no version {version} (versions: {', '.join(versions)})")

    def manifests(self, names: Iterable[str] | None = None) -> Iterator[Manifest]:
        """Every version (of these adapters), lazily in name and version order, each file checked as it is
        read, and each adapter's tags checked to point at its versions: verifying everything finds damage."""
        for name in self.names() if names is None else names:
            versions = self.versions(name)
            for tag, version in self.tags(name).items():
                if version not in versions:
                    raise IndexCorrupt(f"{self._folder(name) / TAGS_FILE}: tag {name}@{tag} points at missing "
                                       f"version {version}")
            for version in versions:
                manifest = self.get(name, version)
                if manifest is not None:  # unless removed meanwhile
                    yield manifest

    # -- writing

    def locked(self):
        """The registry lock: gc holds it throughout, a push while it makes its blobs and version file one step."""
        return registry_lock(self.root)

    @contextmanager
    def _name_locked(self, name: str) -> Iterator[Path]:
        folder = self._folder(name)
        (folder / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
        with FileLock(folder / ".lock"):
            yield folder

    def _write(self, path: Path, data: Any) -> None:
        atomic_write_json(path, data, _text(data), tmp_dir=self.tmp)

    def add(self, manifest: Manifest, before: Callable[[], None] = lambda: None) -> Manifest:
        """Record a version (`before` runs under the registry lock just before, e.g. to re-put its blobs); the
        same content again is a no-op that returns the existing manifest; other content is a Conflict."""
        with self._name_locked(manifest.name):
            existing = already_there(self.get(manifest.name, manifest.version), manifest)
            if existing is not None:
                return existing
            data = manifest.to_dict()
            load_manifest(data, manifest.ref)  # a writer checks what it writes
            with self.locked():
                before()
                self._write(self._version_file(manifest.name, manifest.version), data)
            pause_point("index-committed")
        return manifest

    def set_tag(self, name: str, tag: str, version: str) -> None:
        with self._name_locked(name) as folder:
            if self.get(name, version) is None:
                raise NotFound(f"{name} has no version {version}")
            tags = self.tags(name)
            if tags.get(check_tag(tag)) != version:
                self._write(folder / TAGS_FILE, {**tags, tag: version})

    def delete_tag(self, name: str, tag: str) -> str:
        """Delete a tag; returns the version it pointed at."""
        with self._name_locked(name) as folder:
            tags = self.tags(name)
            if tag not in tags:
                raise NotFound(f"{name} has no tag {tag!r} (tags: {', '.join(sorted(tags)) or 'none'})")
            version = tags.pop(tag)
            self._write(folder / TAGS_FILE, tags)
        return version

    def remove(self, name: str, version: str) -> list[str]:
        """Drop a version and the tags that point at it (tags first: a removal killed between the two leaves
        the version without those tags, never a tag pointing at nothing); returns the tags."""
        with self._name_locked(name) as folder:
            path = self._version_file(name, version)
            if not path.is_file():
                raise NotFound(f"{name} has no version {version}")
            tags = self.tags(name)
            dropped = sorted(t for t, v in tags.items() if v == version)
            if dropped:
                self._write(folder / TAGS_FILE, {t: v for t, v in tags.items() if v != version})
            path.unlink()
            fsync_dir(path.parent)
        return dropped


def _entries(folder: Path) -> list[str]:
    """The names in a folder but dot files (locks, temp files); none if it does not exist."""
    try:
        return sorted(e for e in os.listdir(folder) if not e.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _checked(check: Callable[[str], str], value: str, where: Path) -> str:
    try:
        return check(value)
    except InvalidName as e:
        raise IndexCorrupt(f"{where}: {e}") from None


def _read_json(path: Path) -> Any | None:
    """A file's JSON (None if it does not exist); IndexCorrupt if it is not JSON."""
    try:
        return read_json(path)
    except FileNotFoundError:
        return None


def is_legacy(root: Path) -> bool:
    """Whether a registry root holds its index as one `registry.json` (written before refs/, or a listing a
    repository ships) rather than `refs/`."""
    return not (Path(root) / REFS_DIR).is_dir() and (Path(root) / INDEX_FILE).is_file()


def listing(manifests: Iterable[Manifest], tags: Callable[[str], dict[str, str]]) -> dict[str, Any]:
    """These versions as one `registry.json` (the published schema, hub/registry.schema.json), checked."""
    adapters: dict[str, Any] = {}
    for m in manifests:
        entry = adapters.setdefault(m.name, {"versions": {}, "tags": tags(m.name)})
        entry["versions"][m.version] = m.to_dict()
    data = {"schema_version": SCHEMA_VERSION, "adapters": adapters}
    check_index(data, INDEX_FILE)
    return data


def migrate(root: Path) -> int:
    """Convert a `registry.json` registry to `refs/`, atomically: the refs are written to a temp folder,
    synced, and renamed into place in one step (the moment the registry switches), then `registry.json` is
    renamed to `registry.json.migrated`. Refused, with nothing written, if any entry is damaged. Returns the
    number of versions."""
    root = Path(root)
    legacy = IndexFile(root)
    with legacy.locked():  # no writer of registry.json can change it meanwhile
        if (root / REFS_DIR).is_dir():
            raise HubError(f"{root} is already in the refs/ layout")
        if not legacy.path.is_file():
            raise NotFound(f"{root} has no {INDEX_FILE} to migrate")
        index = legacy.read()
        staging = temp_name(root / TMP_DIR)
        try:
            count = 0
            for name in index.names():  # every entry read is checked: a damaged one stops the migration
                folder = staging / (name if "/" in name else f"{NO_ORG}/{name}")
                (folder / VERSIONS_DIR).mkdir(parents=True)
                for m in index.manifests([name]):
                    (folder / VERSIONS_DIR / f"{m.version}.json").write_text(_text(m.to_dict()) + "\n")
                    count += 1
                tags = index.tags(name)
                if tags:
                    (folder / TAGS_FILE).write_text(_text(tags) + "\n")
            staging.mkdir(parents=True, exist_ok=True)
            os.sync()  # every file durable before the one rename that makes them the index
            pause_point("migrate-staged")
            os.replace(staging, root / REFS_DIR)
            fsync_dir(root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        os.replace(legacy.path, root / (INDEX_FILE + MIGRATED_SUFFIX))
        fsync_dir(root)
    return count
