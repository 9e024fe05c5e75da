"""A directory remote: another registry folder (shared file system, or a checkout's registry.json).

It is read and written as any registry is (hub/refs.py): a pull reads the files of the adapter it takes, and a
push writes one version file and one tags file by atomic rename, which is safe on a network file system."""
from __future__ import annotations

from pathlib import Path

from hub import evals
from hub.errors import NotFound, RemoteError
from hub.index import INDEX_FILE
from hub.manifest import Manifest
from hub.refs import REFS_DIR
from hub.registry import Registry
from hub.remotes import Remote
from hub.store import Progress


class DirectoryRemote(Remote):
    def __init__(self, path: Path):
        self.path = Path(path).expanduser().resolve()
        self.url = str(self.path)

    def _registry(self, must_exist: bool) -> Registry:
        if self.path.exists() and not self.path.is_dir():
            raise RemoteError(f"{self.path} is not a folder")
        if must_exist and not ((self.path / REFS_DIR).is_dir() or (self.path / INDEX_FILE).is_file()):
            raise NotFound(f"{self.path} is not a registry (no {REFS_DIR}/ or {INDEX_FILE})")
        return Registry(self.path)

    def fetch(self, ref: str, local: Registry, progress: Progress | None = None, revision: str | None = None) -> Manifest:
        if revision is not None:
            raise RemoteError("--revision applies to Hugging Face remotes only")
        remote = self._registry(must_exist=True)
        manifest = local.add_from(remote, ref, progress)
        evals.copy(remote.root, local.root, manifest)
        return manifest

    def current(self, ref: str) -> str:
        """Read from the remote's refs (its tags.json, or the name's versions): one small file, no blob."""
        return self._registry(must_exist=True).resolve(ref).ref

    def publish(self, manifest: Manifest, local: Registry, progress: Progress | None = None) -> str:
        """Copy the version and its evaluation records, then point its local tags at it here too (moving them if they exist)."""
        remote = self._registry(must_exist=False)
        remote.add_from(local, manifest.ref, progress)
        evals.copy(local.root, remote.root, manifest)
        for tag in local.version_tags(manifest):
            remote.tag(manifest.ref, tag)
        return self.url
