"""Content-addressed blobs: `blobs/sha256/<2 hex>/<sha256>` under a registry root.

A blob is written to `tmp/` (named after the writing process), fsynced, and renamed into place,
so a blob path either does not exist or holds exactly the bytes its name says. Blobs nothing in
the index refers to (e.g. left by a killed push) are invisible and removed by `gc`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hub.errors import HubError, IntegrityError
from hub.files import open_regular
from hub.manifest import sha256_file

Progress = Callable[[int], None]  # called with the number of bytes just copied
_SHA_LEN = 64
TMP_DIR = ".tmp"  # temp files of live or killed writers; gc removes those of dead processes


_passed: dict[str, int] = {}  # stage -> times reached in this process (for HUB_PUSH_PAUSE_AT=stage#n)


def pause_point(stage: str) -> None:
    """Test hook for the kill-mid-push tests: with HUB_PUSH_PAUSE=<seconds> a push announces each
    stage on stderr as `hub-pause: <stage>#<n>` and sleeps there (only there, if HUB_PUSH_PAUSE_AT
    names one), so a test can SIGKILL it at that exact point, or act and then create the file
    HUB_PUSH_RESUME (if set) to let it go on."""
    delay = os.environ.get("HUB_PUSH_PAUSE")
    if delay:
        _passed[stage] = _passed.get(stage, 0) + 1
        point = f"{stage}#{_passed[stage]}"
        print(f"hub-pause: {point}", file=sys.stderr, flush=True)
        if os.environ.get("HUB_PUSH_PAUSE_AT", point) == point:
            resume = os.environ.get("HUB_PUSH_RESUME")
            end = time.monotonic() + float(delay)
            while time.monotonic() < end and not (resume and os.path.exists(resume)):
                time.sleep(0.05)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(folder: Path, suffix: str = "") -> Path:
    """A temp path owned by this process (gc removes those of processes that are gone)."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{os.getpid()}.{uuid.uuid4().hex}{suffix}"


def owner_alive(path: Path) -> bool:
    """Whether the process that created a temp path (named `<pid>.<...>`) still runs."""
    try:
        pid = int(path.name.split(".", 1)[0])
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def new_folder(out: Path) -> Iterator[Path]:
    """A temp folder beside `out` that becomes `out` (which must be new or empty) only if the block
    succeeds: a reader never sees a half-written folder, and a failure leaves nothing behind."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HubError(f"{out} already exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_hashed(src: Path, dst: Path, progress: Progress | None = None, limit: int | None = None) -> tuple[int, str]:
    """Copy a regular file, fsync it, and return (size, sha256) of the bytes copied; with `limit`, stop after
    limit + 1 bytes (a file longer than its manifest says is refused without copying it all)."""
    h = hashlib.sha256()
    size = 0
    left = -1 if limit is None else limit + 1
    with open_regular(src) as fin, open(dst, "wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20 if left < 0 else min(1 << 20, left - size)), b""):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
            if progress:
                progress(len(chunk))
        fout.flush()
        os.fsync(fout.fileno())
    return size, h.hexdigest()


def check_copy(what: str, got: tuple[int, str], size: int, sha256: str) -> None:
    if got != (size, sha256):
        raise IntegrityError(
            f"{what}: expected {size} bytes with sha256 {sha256[:12]}..., got {got[0]} bytes with sha256 "
            f"{got[1][:12]}... (tampered or corrupted; nothing was changed)"
        )


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.tmp = self.root / TMP_DIR

    def path(self, sha256: str) -> Path:
        if len(sha256) != _SHA_LEN or not all(c in "0123456789abcdef" for c in sha256):
            raise IntegrityError(f"not a sha256 digest: {sha256!r}")
        return self.blobs / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def intact(self, sha256: str, size: int) -> bool:
        """Whether the blob exists and holds the bytes its name says (re-hashed: disks and people damage files)."""
        path = self.path(sha256)
        return path.is_file() and path.stat().st_size == size and sha256_file(path) == (size, sha256)

    def put(self, src: Path, size: int, sha256: str, progress: Progress | None = None, *,
            trust_existing: bool = False) -> bool:
        """Store a file's bytes under their sha256, checking they are what the manifest says; a damaged blob
        already there is replaced (`trust_existing`: one this process just wrote is not hashed again).
        Returns whether a blob was written."""
        final = self.path(sha256)
        if final.is_file() if trust_existing else self.intact(sha256, size):
            if progress:
                progress(size)
            return False
        tmp = temp_name(self.tmp)
        try:
            check_copy(str(src), copy_hashed(src, tmp, progress, limit=size), size, sha256)
            pause_point("blob-written")
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def stored(self) -> Iterator[str]:
        """The digests of every stored blob."""
        if self.blobs.is_dir():
            for sub in self.blobs.iterdir():
                for blob in sub.iterdir():
                    yield blob.name

    def delete(self, sha256: str) -> int:
        path = self.path(sha256)
        size = path.stat().st_size
        path.unlink()
        return size

    def clean_tmp(self) -> int:
        """Remove temp files and folders left by processes that are gone; returns how many."""
        removed = 0
        if self.tmp.is_dir():
            for p in self.tmp.iterdir():
                if not owner_alive(p):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    removed += 1
        return removed
