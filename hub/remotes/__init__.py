"""Remotes: where `hub push --to` sends a version and `hub pull --from` takes one.

A remote is a URL: a directory registry (a path or `file://` URL, e.g. a shared file system, or a
git checkout with its own `registry.json`) or a Hugging Face Hub repo (`hf://org/repo`). Names for
them are kept in `remotes.json` in the local registry root (`hub remote add|list|rm`).
"""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import unquote, urlparse

from hub.errors import InvalidName, NotFound, RemoteError
from hub.index import LOCK_FILE, atomic_write_json
from hub.manifest import Manifest
from hub.registry import Registry
from hub.store import Progress

REMOTES_FILE = "remotes.json"
_REMOTE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


class Remote(ABC):
    """One place versions are pushed to and pulled from."""

    url: str

    @abstractmethod
    def fetch(self, ref: str, local: Registry, progress: Progress | None = None, revision: str | None = None) -> Manifest:
        """Pull `ref` into `local`, verifying every file's sha256; returns the local manifest."""

    def current(self, ref: str) -> str | None:
        """The exact `name@version` a moving ref (`name`, `name@tag`) names on the remote now, read without pulling
        it; None where the remote cannot say cheaply (then a ref already pulled is not looked up again). NotFound
        if the remote has no such ref, RemoteError if it cannot be reached."""
        return None

    @abstractmethod
    def publish(self, manifest: Manifest, local: Registry, progress: Progress | None = None) -> str:
        """Push one local version here with the tags that point at it; returns where it went, for the user."""


def parse_url(url: str) -> Remote:
    """A remote from its URL: `hf://org/repo`, `file:///path`, or a plain path."""
    if url.startswith("hf://"):
        from hub.remotes.hf import HFRemote

        return HFRemote(url[len("hf://"):])
    from hub.remotes.directory import DirectoryRemote

    if url.startswith("file://"):
        return DirectoryRemote(Path(unquote(urlparse(url).path)))
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url):
        raise RemoteError(f"unsupported remote {url!r}: use a folder path, file:///path or hf://org/repo")
    return DirectoryRemote(Path(url))


def canonical_url(url: str) -> str:
    """The URL to record: plain paths become absolute so the remote works from any directory."""
    remote = parse_url(url)
    return remote.url


class Remotes:
    """The named remotes of a local registry (`remotes.json` beside its `registry.json`)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / REMOTES_FILE

    def all(self) -> dict[str, str]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise RemoteError(f"{self.path}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise RemoteError(f"{self.path}: expected an object of remote name -> URL")
        return data

    def _write(self, change) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock  # imported by writers only: no reader locks

        with FileLock(self.root / LOCK_FILE):
            remotes = self.all()
            change(remotes)
            atomic_write_json(self.path, remotes)

    def add(self, name: str, url: str) -> str:
        if not _REMOTE_NAME.fullmatch(name):
            raise InvalidName(f"invalid remote name {name!r}: start with a letter; letters, digits, '_', '-'")
        url = canonical_url(url)

        def change(remotes: dict[str, str]) -> None:
            if name in remotes:
                raise RemoteError(f"remote {name!r} already exists ({remotes[name]}); remove it first")
            remotes[name] = url

        self._write(change)
        return url

    def remove(self, name: str) -> None:
        def change(remotes: dict[str, str]) -> None:
            if name not in remotes:
                raise NotFound(f"no remote named {name!r}")
            del remotes[name]

        self._write(change)

    def open(self, spec: str) -> Remote:
        """A configured remote by name, else `spec` read as a URL or path. A bare word that is neither a
        known name nor an existing path is a mistyped name: reading it as a folder would report a
        missing registry (or, on push, create one) under the current directory."""
        remotes = self.all()
        if spec in remotes:
            return parse_url(remotes[spec])
        if not _looks_like_path(spec):
            known = ", ".join(sorted(remotes)) or "none (add one with `hub remote add NAME URL`)"
            raise NotFound(f"no remote named {spec!r}; known remotes: {known}")
        return parse_url(spec)


def _looks_like_path(spec: str) -> bool:
    """A URL (`scheme://`), a path with a separator or a leading `.`/`~`, or something that exists."""
    return "://" in spec or "/" in spec or "\\" in spec or spec.startswith((".", "~")) or Path(spec).exists()
