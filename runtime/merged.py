"""Per-request merges (LoRAX's `merged_adapters`): a request in COMPOSITION_MODE_MERGE is served by ONE
adapter, the merge of its adapters (hub.merge), built once and then resident like any other.

A `MergedManifest` stands in for a registry manifest in the AdapterPool. Its key is a digest of the
exact parent versions (name@version and artifact sha256, resolved when the request arrives, so a
moved tag gives a new key) and of every merge parameter, so two requests share a merged adapter
exactly when they would build the same one. The pool builds it on first use (`build`, from parents
it reads and checks against the served base as it reads any adapter), counts its device bytes
against the adapter memory budget, evicts it like any other, and rebuilds it if it ever was
dropped from host memory too; besides the bytes, each tier holds at most `max_merged` idle merges
(LRU), since every new set of merge parameters makes another. DARE merges are deterministic: the seed (default 0) is in the key.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Sequence

from hub.artifact import Adapter, Technique
from hub.manifest import BaseModelInfo, Manifest
from hub.merge import merge
from hub.merge_spec import MergeError, MergeSpec
from runtime.errors import InvalidArgument

KEY_PREFIX = "merge:"
NAME = "merge"  # the metrics label and AdapterInfo name of every merged adapter (bounded cardinality)


@dataclass(frozen=True)
class MergeOptions:
    """A request's merge parameters as each frontend reads them (gRPC MergeOptions, HTTP `merge`); None = default."""

    method: str = ""
    density: float | None = None
    majority_sign: str | None = None
    svd_rank: int | None = None
    svd_clamp: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class MergedManifest:
    """What the pool needs of a manifest, for a merge of exact parent versions with exact parameters."""

    parents: tuple[Manifest, ...]  # in request order
    spec: MergeSpec  # checked: defaults filled in
    technique: str
    digest: str
    base_model: BaseModelInfo = BaseModelInfo()  # no recorded fingerprint: `read` checks each parent's

    @property
    def ref(self) -> str:
        return KEY_PREFIX + self.digest[:32]

    @property
    def name(self) -> str:
        return NAME

    @property
    def version(self) -> str:
        return self.digest[:32]

    @property
    def sha256(self) -> str:
        return self.digest

    @property
    def size(self) -> int:
        """An estimate before it is built: the parents' sizes."""
        return sum(m.size for m in self.parents)

    def build(self, read: Callable[[Manifest], Adapter]) -> Adapter:
        """The merged adapter, from parents read by `read` (the pool's verified read)."""
        adapters = [read(m) for m in self.parents]
        try:
            return merge(adapters, self.spec)
        except MergeError as e:
            refs = ", ".join(m.ref for m in self.parents)
            raise InvalidArgument(f"cannot merge {refs}: {e}") from None


def merge_spec(options: MergeOptions, weights: Sequence[float]) -> MergeSpec:
    """The hub.merge spec a request's merge options and adapter weights ask for (unchecked)."""
    return MergeSpec(method=options.method, weights=tuple(float(w) for w in weights), density=options.density,
                     majority_sign=options.majority_sign or None, svd_rank=options.svd_rank,
                     svd_clamp=options.svd_clamp, seed=options.seed)


def merge_key(parents: Sequence[Manifest], spec: MergeSpec) -> str:
    """sha256 over the exact parents (ref + artifact sha256, in order) and the checked parameters."""
    payload = {"parents": [[m.ref, m.sha256] for m in parents], **spec.params()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def merged_manifest(parents: Sequence[Manifest], weights: Sequence[float], options: MergeOptions) -> MergedManifest:
    """Check a merge request (InvalidArgument on any problem) and name the adapter that serves it."""
    if not parents:
        raise InvalidArgument("merge mode needs at least one adapter")
    if not options.method:
        raise InvalidArgument("merge mode needs merge.method")
    techniques = sorted({m.technique for m in parents})
    if len(techniques) > 1:
        raise InvalidArgument(f"cannot merge adapters of different techniques: {', '.join(techniques)}")
    try:
        spec = merge_spec(options, weights).checked(Technique(techniques[0]), len(parents))
    except MergeError as e:
        raise InvalidArgument(str(e)) from None
    return MergedManifest(tuple(parents), spec, techniques[0], merge_key(parents, spec))
