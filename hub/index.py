"""The registry index (`registry.json`): load and validate it, resolve references, and change it
atomically under a file lock.

Writes go to a temp file that is fsynced and renamed over `registry.json`, so a reader (or a
process killed mid-write) only ever sees the old or the new index. Every change is
read-modify-write under `.registry.lock`, so concurrent pushes from several processes all land.
"""
from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from filelock import FileLock

from hub.errors import Conflict, HubError, IndexCorrupt, NotFound
from hub.manifest import Manifest, artifact_digest, check_name, check_tag, check_version, parse_ref, version_key
from hub.store import TMP_DIR, fsync_dir, pause_point, temp_name

INDEX_FILE = "registry.json"
LOCK_FILE = ".registry.lock"
SCHEMA_VERSION = 1
SCHEMA_FILE = Path(__file__).with_name("registry.schema.json")


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text())
    return jsonschema.Draft202012Validator(schema)


def atomic_write_json(path: Path, data: Any, text: str | None = None, tmp_dir: Path | None = None) -> None:
    """Write JSON so that `path` holds either its old or its new content, never a mix. `text`: `data` already
    serialized as json.dumps(data, indent=1, sort_keys=True) gives it; `tmp_dir`: where the temp file goes
    (default: a temp folder beside `path`), on the same file system."""
    tmp = temp_name(tmp_dir if tmp_dir is not None else path.parent / TMP_DIR, ".json")
    try:
        with open(tmp, "w") as f:
            f.write(text if text is not None else json.dumps(data, indent=1, sort_keys=True))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        pause_point("index-temp-written")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def index_text(data: dict[str, Any], texts: dict[str, tuple[Any, str]]) -> str:
    """`data` as json.dumps(data, indent=1, sort_keys=True) writes it, reusing the text of adapter entries that
    are the very objects serialized before (`texts`: name -> (entry, its text), updated here). Entries are
    copied before they change (Index._entry), so an entry object's text never goes stale; a push then
    serializes one entry, not all (Python's indenting encoder is slow on a large index)."""
    adapters = data.get("adapters")
    parts = []
    for key in sorted(data):
        if key == "adapters" and isinstance(adapters, dict) and adapters:
            fresh: dict[str, tuple[Any, str]] = {}
            for name, entry in adapters.items():
                known = texts.get(name)
                fresh[name] = known if known is not None and known[0] is entry else (
                    entry, json.dumps(entry, indent=1, sort_keys=True).replace("\n", "\n  "))
            texts.clear()
            texts.update(fresh)
            value = "{\n  " + ",\n  ".join(f"{json.dumps(n)}: {fresh[n][1]}" for n in sorted(adapters)) + "\n }"
        else:
            value = json.dumps(data[key], indent=1, sort_keys=True).replace("\n", "\n ")
        parts.append(f"{json.dumps(key)}: {value}")
    return "{\n " + ",\n ".join(parts) + "\n}" if parts else "{}"


class Index:
    """An in-memory registry index; `IndexFile.update()` hands out a private one for a locked change.

    `IndexFile.read()` hands every reader the same `shared` index (parsing a large index on every request
    holds the GIL); a shared index refuses changes, and manifests are handed out as copies.

    An adapter's entry is checked against the schema when it is first used, not when the index is read:
    validating every entry on every read costs time in proportion to the whole registry. Writers
    check what they change before it is written; listing (and so `hub verify`) checks every entry.
    """

    def __init__(self, data: dict[str, Any] | None = None, source: str = INDEX_FILE, *, shared: bool = False):
        self.data: dict[str, Any] = data if data is not None else {"schema_version": SCHEMA_VERSION, "adapters": {}}
        self.source = source
        self.shared = shared
        self.changed: set[str] = set()  # adapters whose entries add/remove/set_tag changed (copied first)
        self._checked: set[str] = set()  # adapters whose entries passed _check
        adapters = self.data.get("adapters") if isinstance(self.data, dict) else None
        # the top level alone (schema version, `adapters` an object): the entries are checked as used
        check_index(self.data if not isinstance(adapters, dict) else {**self.data, "adapters": {}}, source)

    def _adapter(self, name: str) -> dict[str, Any] | None:
        """The entry of `name` (None if there is none), checked against the schema the first time it is used."""
        entry = self.data["adapters"].get(name)
        if entry is not None and name not in self._checked:
            self._check([name])
            self._checked.add(name)
        return entry

    def _check(self, names: Iterable[str]) -> None:
        """Validate these adapters' entries (the ones still there): every rule is per adapter."""
        adapters = self.data["adapters"]
        check_index({**self.data, "adapters": {n: adapters[n] for n in names if n in adapters}}, self.source)

    # -- reading

    def names(self, prefix: str | None = None) -> list[str]:
        return sorted(n for n in self.data["adapters"] if prefix is None or n.startswith(prefix))

    def manifests(self, names: Iterable[str] | None = None) -> Iterator[Manifest]:
        """Every version (of these adapters), each entry checked as it is reached: listing or verifying
        everything finds damage anywhere."""
        for name in self.names() if names is None else names:
            for version in self.versions(name):
                manifest = self.get(name, version)
                if manifest is not None:  # else removed from this index while the caller held the generator
                    yield manifest

    def versions(self, name: str) -> list[str]:
        """Versions of an adapter, oldest first (semantic-versioning order)."""
        entry = self._adapter(name)
        return sorted(entry["versions"], key=version_key) if entry else []

    def tags(self, name: str) -> dict[str, str]:
        entry = self._adapter(name)
        return dict(entry["tags"]) if entry else {}

    def get(self, name: str, version: str) -> Manifest | None:
        entry = self._adapter(name)
        if not entry or version not in entry["versions"]:
            return None
        return Manifest.from_dict(entry["versions"][version])

    def resolve(self, ref: str) -> Manifest:
        """`name` (latest version), `name@1.2.0` or `name@tag` -> its manifest."""
        name, version, tag = parse_ref(ref)
        entry = self._adapter(name)
        if entry is None:
            raise NotFound(f"no adapter named {name!r}")
        if tag is not None:
            if tag not in entry["tags"]:
                raise NotFound(f"{name} has no tag {tag!r} (tags: {', '.join(sorted(entry['tags'])) or 'none'})")
            version = entry["tags"][tag]
        elif version is None:
            version = self.versions(name)[-1]
        manifest = self.get(name, version)
        if manifest is None:
            raise NotFound(f"{name} has no version {version} (versions: {', '.join(self.versions(name))})")
        return manifest

    # -- changing (only inside IndexFile.update())

    def add(self, manifest: Manifest) -> Manifest:
        """Record a version; the same content again is a no-op that returns the existing manifest."""
        existing = already_there(self.get(manifest.name, manifest.version), manifest)
        if existing is not None:
            return existing
        self._entry(manifest.name, create=True)["versions"][manifest.version] = manifest.to_dict()
        return manifest

    def remove(self, name: str, version: str) -> None:
        """Drop a version and the tags that point at it (its blobs go at the next gc)."""
        entry = self._entry(name)
        del entry["versions"][version]
        entry["tags"] = {t: v for t, v in entry["tags"].items() if v != version}
        if not entry["versions"]:
            del self.data["adapters"][name]

    def set_tag(self, name: str, tag: str, version: str) -> None:
        check_name(name)
        check_version(version)
        if self.tags(name).get(check_tag(tag)) != version:
            self._entry(name)["tags"][tag] = version

    def delete_tag(self, name: str, tag: str) -> None:
        del self._entry(name)["tags"][tag]

    def _entry(self, name: str, create: bool = False) -> dict[str, Any]:
        """The entry of `name` to change: copied on first change, so the index it came from keeps its own."""
        if self.shared:
            raise RuntimeError("a registry index handed to readers cannot change: use IndexFile.update()")
        adapters = self.data["adapters"]
        if name not in self.changed or (create and name not in adapters):  # or removed in this change
            entry = self._adapter(name)
            if entry is None:
                entry = {"versions": {}, "tags": {}} if create else adapters[name]
            adapters[name] = copy.deepcopy(entry)
            self.changed.add(name)
        return adapters[name]

    def private_copy(self) -> Index:
        """An index to change that shares the unchanged entries with this one (they are copied on change)."""
        index = Index({**self.data, "adapters": dict(self.data["adapters"])}, self.source)
        index._checked = set(self._checked)
        return index

    def check_changed(self) -> None:
        """Validate the changed entries before they are written."""
        self._check(self.changed)
        self._checked |= self.changed


def check_index(data: Any, source: str) -> None:
    """Validate index data against the registry schema and the rules a schema cannot say."""
    errors = sorted(_validator().iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(top level)"
        raise IndexCorrupt(f"{source}: does not match the registry schema at {where}: {errors[0].message}")
    for name, entry in data["adapters"].items():
        for version, m in entry["versions"].items():
            if (m["name"], m["version"]) != (name, version):
                raise IndexCorrupt(f"{source}: entry {name}@{version} holds a manifest of {m['name']}@{m['version']}")
            if m["sha256"] != artifact_digest(m["files"]):
                raise IndexCorrupt(f"{source}: {name}@{version}: digest does not match its file list")
        for tag, version in entry["tags"].items():
            if version not in entry["versions"]:
                raise IndexCorrupt(f"{source}: tag {name}@{tag} points at missing version {version}")


def already_there(existing: Manifest | None, manifest: Manifest) -> Manifest | None:
    """The version `manifest` would add, if it exists with the same content (an add is then a no-op);
    Conflict if it exists with other content (versions are immutable)."""
    if existing is not None and existing.sha256 != manifest.sha256:
        raise Conflict(f"{manifest.ref} already exists with different content (sha256 {existing.sha256[:12]}...); "
                       "versions are immutable: push a new version")
    return existing


def read_json(path: Path) -> Any:
    """A file's JSON; IndexCorrupt (one line) if it is not JSON."""
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexCorrupt(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise IndexCorrupt(f"{path}: not valid JSON (nested too deeply)") from None


@contextmanager
def registry_lock(root: Path) -> Iterator[None]:
    """The registry's lock (`.registry.lock` in its root): writers of registry.json, gc, and a push's last step."""
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / LOCK_FILE):
        yield


def load_manifest(data: Any, source: str) -> Manifest:
    """A manifest read from elsewhere (e.g. a Hugging Face repo), validated against the index schema."""
    if not isinstance(data, dict):
        raise IndexCorrupt(f"{source}: expected a JSON object")
    wrapped = {"adapters": {str(data.get("name")): {"versions": {str(data.get("version")): data}, "tags": {}}}}
    check_index({"schema_version": SCHEMA_VERSION, **wrapped}, source)
    return Manifest.from_dict(data)


class IndexFile:
    """`registry.json` in a registry root, with its lock."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / INDEX_FILE
        # (file identity, index) of the last index this object read, handed to every reader until the file
        # changes: parsing it on every read costs every request time in proportion to the registry.
        self._last: tuple[tuple[int, int, int], Index] | None = None
        # One parse at a time: a server's first burst of requests would otherwise parse the same index
        # once per request thread, all at once.
        self._parsing = threading.Lock()
        self._texts: dict[str, tuple[Any, str]] = {}  # adapter entries' JSON text, for the next write (index_text)

    def _identity(self) -> tuple[int, int, int]:
        st = self.path.stat()  # writes are renames: a new index is a new inode, mtime and usually size
        return st.st_ino, st.st_mtime_ns, st.st_size

    def read(self) -> Index:
        """The current index, shared by readers (no file lock needed: writes are atomic renames).

        A missing file is an empty index."""
        if not self.path.is_file():
            return Index()
        cached = self._cached()
        if cached is not None:
            return cached
        with self._parsing:
            cached = self._cached()  # another thread may have read it meanwhile
            return cached if cached is not None else self._parse()

    def _cached(self) -> Index | None:
        """The index as last read, if the file has not changed since."""
        cached = self._last
        return cached[1] if cached is not None and cached[0] == self._identity() else None

    def _parse(self) -> Index:
        identity = self._identity()
        index = Index(read_json(self.path), str(self.path), shared=True)
        if self._identity() == identity:  # not replaced while it was read
            self._last = (identity, index)
        return index

    def locked(self):
        return registry_lock(self.root)

    @contextmanager
    def update(self) -> Iterator[Index]:
        """Read-modify-write under the lock; nothing is written if the block raises or changes nothing."""
        with self.locked():
            if (self.root / "refs").is_dir():  # `hub migrate` ran since this registry was opened
                raise HubError(f"{self.root}: {INDEX_FILE} was migrated to refs/; run the command again")
            index = self.read().private_copy()
            yield index
            if index.changed:
                index.check_changed()
                atomic_write_json(self.path, index.data, index_text(index.data, self._texts))
                index.shared = True  # readers get it from now on
                self._last = (self._identity(), index)
                pause_point("index-committed")


class JsonStore:
    """A registry whose index is one `registry.json` (written before refs/ existed, or the listing a repository
    ships): the same writes as `hub.refs.RefStore`, each a locked read-modify-write of the whole file."""

    def __init__(self, root: Path):
        self.index_file = IndexFile(root)

    def reader(self) -> Index:
        return self.index_file.read()

    def locked(self):
        return self.index_file.locked()

    def add(self, manifest: Manifest, before=lambda: None) -> Manifest:
        with self.index_file.update() as index:
            if index.get(manifest.name, manifest.version) is None:
                before()
            return index.add(manifest)

    def set_tag(self, name: str, tag: str, version: str) -> None:
        with self.index_file.update() as index:
            if index.get(name, version) is None:
                raise NotFound(f"{name} has no version {version}")
            index.set_tag(name, tag, version)

    def delete_tag(self, name: str, tag: str) -> str:
        with self.index_file.update() as index:
            version = index.resolve(f"{name}@{tag}").version
            index.delete_tag(name, tag)
        return version

    def remove(self, name: str, version: str) -> list[str]:
        with self.index_file.update() as index:
            index.resolve(f"{name}@{version}")
            dropped = sorted(t for t, v in index.tags(name).items() if v == version)
            index.remove(name, version)
        return dropped
