"""Where the hub keeps its files: `$HUB_HOME`, default `~/.cache/adapterhub`."""
from __future__ import annotations

import os
from pathlib import Path


def hub_home() -> Path:
    """The hub's home directory (the local registry and the prepared base models live here)."""
    return Path(os.environ.get("HUB_HOME") or Path.home() / ".cache" / "adapterhub").expanduser()
