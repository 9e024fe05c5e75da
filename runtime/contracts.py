"""What the adapter pool relies on, typed: the engine it loads adapters into, the registry it reads them from,
and the manifests it keys them by.

Protocols rather than base classes, so the real Engine and Registry satisfy them as they are and a test can
hand the pool a stand-in; the point is that the pool's needs are written down in one place.
"""
from __future__ import annotations

from typing import Callable, Protocol, Union

from torch import nn

from hub.artifact import Adapter
from hub.manifest import Manifest
from runtime.merged import MergedManifest
from runtime.techniques.base import Resident

# A pool entry serves either a version from the registry or a per-request merge built from such versions.
ServedManifest = Union[Manifest, MergedManifest]


class PoolEngine(Protocol):
    """What the pool needs of the engine (runtime.engine.Engine)."""

    @property
    def model(self) -> nn.Module: ...

    def weights_bytes(self, adapter: Adapter) -> int: ...

    def prepare(self, key: str, adapter: Adapter) -> Resident: ...

    def install(self, resident: Resident) -> int: ...

    def unload(self, key: str) -> None: ...


class AdapterSource(Protocol):
    """What the pool needs of the registry (hub.registry.Registry)."""

    def resolve(self, ref: str) -> Manifest: ...

    def read_deferred(self, manifest: Manifest) -> tuple[Adapter, Callable[[], None]]: ...
