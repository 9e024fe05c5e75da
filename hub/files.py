"""Opening the files an artifact names: regular files only, never through a symbolic link, never waiting.

An adapter folder or a remote registry is written by someone else. A symbolic link in it would copy
e.g. /etc/passwd into the registry and on to remotes; a FIFO or /dev/zero would hang a push forever.
So a file is checked with lstat and opened with O_NOFOLLOW and O_NONBLOCK (a FIFO opens at once), then
checked again on the open descriptor; a path below a registry root is also checked folder by folder.
"""
from __future__ import annotations

import errno
import os
import stat
from io import BufferedReader
from pathlib import Path

from hub.errors import HubError

_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class NotRegularFile(HubError):
    """A path an artifact names that is a symbolic link, device, FIFO or anything but a regular file."""


def kind(mode: int) -> str:
    """What a file mode is, for the error line ("a regular file" when it is one)."""
    return next((name for test, name in _KINDS if test(mode)), "a regular file" if stat.S_ISREG(mode) else "special")


def refuse(path: Path, mode: int) -> NotRegularFile:
    return NotRegularFile(f"{path} is {kind(mode)}, not a regular file: refused (artifacts hold regular files only)")


def check_regular(path: Path) -> os.stat_result:
    """lstat `path`; NotRegularFile unless it is a regular file (a link to one is refused too)."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise refuse(path, st.st_mode)
    return st


def check_below(root: Path, path: Path) -> Path:
    """`path`, after checking that every folder between `root` and it is a real folder, not a link."""
    folder = Path(root)
    for part in Path(path).relative_to(root).parts[:-1]:
        folder = folder / part
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode):
            raise NotRegularFile(f"{folder} is {kind(st.st_mode)}, not a folder: refused "
                                 "(a registry's paths may not lead through links)")
    return path


def open_regular(path: Path) -> BufferedReader:
    """Open a regular file for reading without following a link at its end or blocking on a FIFO."""
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:  # replaced by a link since the lstat
            raise refuse(Path(path), stat.S_IFLNK) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise refuse(Path(path), mode)
    return os.fdopen(fd, "rb")


def resolve_within(path: Path, root: Path) -> Path:
    """The regular file a link at `path` leads to, if it stays inside `root` (a Hugging Face cache links each
    snapshot file to a blob of the same repo); NotRegularFile if it leads elsewhere."""
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(os.path.realpath(root)):
        raise NotRegularFile(f"{path} is a symbolic link leading outside {root}: refused")
    check_regular(target)
    return target
