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
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from filelock import FileLock

from hub.errors import Conflict, IndexCorrupt, NotFound
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


def atomic_write_json(path: Path, data: Any, text: str | None = None) -> None:
    """Write JSON so that `path` holds either its old or its new content, never a mix. `text`: `data` already
    serialized as json.dumps(data, indent=1, sort_keys=True) gives it."""
    tmp = temp_name(path.parent / TMP_DIR, ".json")
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
    serializes one entry, not all (Python's indenting encoder took ~45 ms for 1,000 versions)."""
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

    `IndexFile.read()` hands every reader the same `shared` index (parsing 1,000 versions cost ~8 ms of
    GIL per request); a shared index refuses changes, and manifests are handed out as copies.
    """

    def __init__(self, data: dict[str, Any] | None = None, source: str = INDEX_FILE, *, checked: bool = False,
                 shared: bool = False):
        self.data = data if data is not None else {"schema_version": SCHEMA_VERSION, "adapters": {}}
        self.shared = shared
        self.changed: set[str] = set()  # adapters whose entries add/remove/set_tag changed (copied first)
        if not checked:  # `checked`: data this process validated before (IndexFile's cache)
            self._check(source)

    @classmethod
    def validated(cls, data: Any, source: str, known: Index | None) -> Index:
        """`data` validated; adapter entries equal to `known`'s (validated before) are not checked again.

        Every rule is per adapter, so after a push a server re-checks one entry, not the whole index
        (jsonschema over 1,000 versions took ~400 ms with the GIL held).
        """
        if (known is not None and isinstance(data, dict) and isinstance(data.get("adapters"), dict)
                and _outside_adapters(data) == _outside_adapters(known.data)):
            before = known.data["adapters"]
            _check_adapters(data, [n for n, e in data["adapters"].items() if before.get(n) != e], source)
            return cls(data, source, checked=True)
        return cls(data, source)

    def _check(self, source: str) -> None:
        errors = sorted(_validator().iter_errors(self.data), key=lambda e: list(e.absolute_path))
        if errors:
            where = "/".join(str(p) for p in errors[0].absolute_path) or "(top level)"
            raise IndexCorrupt(f"{source}: does not match the registry schema at {where}: {errors[0].message}")
        for name, entry in self.data["adapters"].items():
            for version, m in entry["versions"].items():
                if (m["name"], m["version"]) != (name, version):
                    raise IndexCorrupt(f"{source}: entry {name}@{version} holds a manifest of {m['name']}@{m['version']}")
                if m["sha256"] != artifact_digest(m["files"]):
                    raise IndexCorrupt(f"{source}: {name}@{version}: digest does not match its file list")
            for tag, version in entry["tags"].items():
                if version not in entry["versions"]:
                    raise IndexCorrupt(f"{source}: tag {name}@{tag} points at missing version {version}")

    # -- reading

    def manifests(self) -> Iterator[Manifest]:
        for name in sorted(self.data["adapters"]):
            for version in self.versions(name):
                yield self.get(name, version)

    def versions(self, name: str) -> list[str]:
        """Versions of an adapter, oldest first (semantic-versioning order)."""
        entry = self.data["adapters"].get(name)
        return sorted(entry["versions"], key=version_key) if entry else []

    def tags(self, name: str) -> dict[str, str]:
        entry = self.data["adapters"].get(name)
        return dict(entry["tags"]) if entry else {}

    def get(self, name: str, version: str) -> Manifest | None:
        entry = self.data["adapters"].get(name)
        if not entry or version not in entry["versions"]:
            return None
        return Manifest.from_dict(entry["versions"][version])

    def resolve(self, ref: str) -> Manifest:
        """`name` (latest version), `name@1.2.0` or `name@tag` -> its manifest."""
        name, version, tag = parse_ref(ref)
        entry = self.data["adapters"].get(name)
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

    def referenced_blobs(self) -> set[str]:
        """Digests of the blobs some version stores in the blob store (not those in a `path` folder)."""
        return {f["sha256"] for m in self.manifests() if m.path is None for f in m.files.values()}

    # -- changing (only inside IndexFile.update())

    def add(self, manifest: Manifest) -> Manifest:
        """Record a version; the same content again is a no-op that returns the existing manifest."""
        existing = self.get(manifest.name, manifest.version)
        if existing is not None:
            if existing.sha256 == manifest.sha256:
                return existing
            raise Conflict(
                f"{manifest.ref} already exists with different content (sha256 {existing.sha256[:12]}...); "
                "versions are immutable: push a new version"
            )
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
        if self.data["adapters"][name]["tags"].get(check_tag(tag)) != version:
            self._entry(name)["tags"][tag] = version

    def delete_tag(self, name: str, tag: str) -> None:
        del self._entry(name)["tags"][tag]

    def _entry(self, name: str, create: bool = False) -> dict[str, Any]:
        """The entry of `name` to change: copied on first change, so the index it came from keeps its own."""
        if self.shared:
            raise RuntimeError("a registry index handed to readers cannot change: use IndexFile.update()")
        adapters = self.data["adapters"]
        if name not in self.changed or (create and name not in adapters):  # or removed in this change
            entry = adapters.get(name, {"versions": {}, "tags": {}}) if create else adapters[name]
            adapters[name] = copy.deepcopy(entry)
            self.changed.add(name)
        return adapters[name]

    def private_copy(self) -> Index:
        """An index to change that shares the unchanged entries with this one (they are copied on change)."""
        return Index({**self.data, "adapters": dict(self.data["adapters"])}, checked=True)

    def check_changed(self, source: str) -> None:
        """Validate the changed entries (every rule is per adapter)."""
        _check_adapters(self.data, self.changed, source)


def _check_adapters(data: dict[str, Any], names, source: str) -> None:
    """Validate `data` with only these adapters' entries (the ones still there): every rule is per adapter."""
    adapters = data["adapters"]
    Index({**data, "adapters": {n: adapters[n] for n in names if n in adapters}}, source)


def _outside_adapters(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "adapters"}


def load_manifest(data: Any, source: str) -> Manifest:
    """A manifest read from elsewhere (e.g. a Hugging Face repo), validated against the index schema."""
    if not isinstance(data, dict):
        raise IndexCorrupt(f"{source}: expected a JSON object")
    wrapped = {"adapters": {str(data.get("name")): {"versions": {str(data.get("version")): data}, "tags": {}}}}
    Index({"schema_version": SCHEMA_VERSION, **wrapped}, source=source)
    return Manifest.from_dict(data)


class IndexFile:
    """`registry.json` in a registry root, with its lock."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / INDEX_FILE
        # (file identity, index) of the last index this object validated, handed to every reader: validating
        # the whole index on every read cost O(versions) per resolve, and O(versions^2) to push a thousand
        # adapters; parsing it on every read ~8 ms per request at 1,000 versions.
        self._validated: tuple[tuple[int, int, int], Index] | None = None
        # One validation at a time: a server's first burst of requests would otherwise validate the
        # same index once per request thread, all at once (measured: 16 threads x 1,000 versions, 7 s).
        self._validating = threading.Lock()
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
        with self._validating:
            cached = self._cached()  # another thread may have validated it meanwhile
            return cached if cached is not None else self._read_and_validate()

    def _cached(self) -> Index | None:
        """The index as last validated, if the file has not changed since."""
        cached = self._validated
        return cached[1] if cached is not None and cached[0] == self._identity() else None

    def _read_and_validate(self) -> Index:
        identity = self._identity()
        try:
            data = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IndexCorrupt(f"{self.path}: not valid JSON ({e})") from None
        except RecursionError:
            raise IndexCorrupt(f"{self.path}: not valid JSON (nested too deeply)") from None
        known = self._validated[1] if self._validated is not None else None
        index = Index.validated(data, str(self.path), known)
        index.shared = True
        if self._identity() == identity:  # not replaced while it was read
            self._validated = (identity, index)
        return index

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(self.root / LOCK_FILE):
            yield

    @contextmanager
    def update(self) -> Iterator[Index]:
        """Read-modify-write under the lock; nothing is written if the block raises or changes nothing."""
        with self.locked():
            index = self.read().private_copy()
            yield index
            if index.changed:
                index.check_changed(str(self.path))
                atomic_write_json(self.path, index.data, index_text(index.data, self._texts))
                index.shared = True  # readers get it from now on
                self._validated = (self._identity(), index)
                pause_point("index-committed")
