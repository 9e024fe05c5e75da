"""A bulk push's list file (`hub push --batch FILE`): JSON Lines, one adapter folder a line,

    {"path": "runs/a", "name": "team/a", "version": "1.0.0", "base_model": "smollm2-135m", "tags": ["x"]}

with `path`, `name` and `version` required and `base_model`, `description`, `tags` (a list of texts) and
`license` optional. Every line is checked before anything is pushed, and each bad one is reported with its
number, so a list with a typo on line 700 pushes nothing instead of 699 versions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.errors import HubError
from hub.manifest import check_name, check_version

REQUIRED = ("path", "name", "version")
# optional key -> (what its value must be, the check)
OPTIONAL: dict[str, tuple[str, Any]] = {
    "base_model": ("a text or null", lambda v: v is None or isinstance(v, str)),
    "description": ("a text", lambda v: isinstance(v, str)),
    "tags": ("a list of texts", lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v)),
    "license": ("a text or null", lambda v: v is None or isinstance(v, str)),
}


class BatchError(HubError):
    """The list's bad lines, one problem each (`problems`), every one naming the file and line."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class BatchEntry:
    """One line of the list: the folder to push as name@version, and the push's options."""

    line: int
    path: Path
    name: str
    version: str
    options: dict[str, Any] = field(default_factory=dict)  # base_model, description, tags, license


def read_batch(file: Path, defaults: dict[str, Any]) -> list[BatchEntry]:
    """The entries of a list file, `defaults` filling the optional keys a line leaves out; a relative `path`
    is taken from the list file's folder. BatchError naming every bad line; OSError if it cannot be read."""
    file = Path(file)
    entries: list[BatchEntry] = []
    problems: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    for number, raw in enumerate(file.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            entry = _entry(number, raw, file.parent, defaults)
            ref = (entry.name, entry.version)
            if ref in seen:
                raise HubError(f"{entry.name}@{entry.version} is also line {seen[ref]}")
            seen[ref] = number
            entries.append(entry)
        except HubError as e:
            problems.append(f"{file}:{number}: {e}")
    if problems:
        raise BatchError(problems)
    if not entries:
        raise HubError(f"{file}: names no folder to push")
    return entries


def _entry(number: int, raw: bytes, folder: Path, defaults: dict[str, Any]) -> BatchEntry:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HubError(f"not a JSON object ({e})") from None
    except RecursionError:
        raise HubError("not a JSON object (nested too deeply)") from None
    if not isinstance(data, dict):
        raise HubError(f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise HubError(f"unknown key {', '.join(map(repr, unknown))} (known: {', '.join((*REQUIRED, *OPTIONAL))})")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise HubError(f"missing {', '.join(map(repr, missing))}")
    for key in REQUIRED:
        if not isinstance(data[key], str):
            raise HubError(f"{key!r} must be a text, got {data[key]!r}")
    for key, (what, ok) in OPTIONAL.items():
        if key in data and not ok(data[key]):
            raise HubError(f"{key!r} must be {what}, got {data[key]!r}")
    path = folder / data["path"]
    if not path.is_dir():
        raise HubError(f"{path}: not a folder")
    options = {key: data.get(key, defaults.get(key)) for key in OPTIONAL}
    return BatchEntry(number, path, check_name(data["name"]), check_version(data["version"]), options)
