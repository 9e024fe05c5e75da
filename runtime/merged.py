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
from typing import Any, Callable, Sequence

import grpc

from hub.artifact import Adapter, Technique
from hub.manifest import BaseModelInfo
from hub.merge import merge
from hub.merge_spec import MergeError, MergeSpec
from runtime.errors import ServeError
from runtime.proto.adapterhub.v1 import runtime_pb2 as pb

KEY_PREFIX = "merge:"
NAME = "merge"  # the metrics label and AdapterInfo name of every merged adapter (bounded cardinality)


def _invalid(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class MergedManifest:
    """What the pool needs of a manifest, for a merge of exact parent versions with exact parameters."""

    parents: tuple[Any, ...]  # hub.manifest.Manifest, in request order
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

    def build(self, read: Callable[[Any], Adapter]) -> Adapter:
        """The merged adapter, from parents read by `read` (the pool's verified read)."""
        adapters = [read(m) for m in self.parents]
        try:
            return merge(adapters, self.spec)
        except MergeError as e:
            refs = ", ".join(m.ref for m in self.parents)
            raise _invalid(f"cannot merge {refs}: {e}") from None


def merge_spec(options: pb.MergeOptions, weights: Sequence[float]) -> MergeSpec:
    """The hub.merge spec a request's MergeOptions and adapter weights ask for (unchecked)."""
    return MergeSpec(
        method=options.method,
        weights=tuple(float(w) for w in weights),
        density=options.density if options.HasField("density") else None,
        majority_sign=options.majority_sign or None,
        svd_rank=options.svd_rank if options.HasField("svd_rank") else None,
        svd_clamp=options.svd_clamp if options.HasField("svd_clamp") else None,
        seed=options.seed if options.HasField("seed") else None,
    )


def merge_key(parents: Sequence[Any], spec: MergeSpec) -> str:
    """sha256 over the exact parents (ref + artifact sha256, in order) and the checked parameters."""
    payload = {"parents": [[m.ref, m.sha256] for m in parents], **spec.params()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def merged_manifest(parents: Sequence[Any], weights: Sequence[float], options: pb.MergeOptions) -> MergedManifest:
    """Check a merge request (INVALID_ARGUMENT on any problem) and name the adapter that serves it."""
    if not parents:
        raise _invalid("merge mode needs at least one adapter")
    if not options.method:
        raise _invalid("merge mode needs merge.method")
    techniques = sorted({m.technique for m in parents})
    if len(techniques) > 1:
        raise _invalid(f"cannot merge adapters of different techniques: {', '.join(techniques)}")
    try:
        spec = merge_spec(options, weights).checked(Technique(techniques[0]), len(parents))
    except MergeError as e:
        raise _invalid(str(e)) from None
    return MergedManifest(tuple(parents), spec, techniques[0], merge_key(parents, spec))


_OPTION_TYPES = {"density": float, "majority_sign": str, "svd_rank": int, "svd_clamp": float, "seed": int}


def parse_merge_options(text: str) -> pb.MergeOptions:
    """The CLI's --merge, `METHOD[,density=D][,majority_sign=S][,svd_rank=R][,svd_clamp=Q][,seed=N]`, as MergeOptions."""
    method, *pairs = [p.strip() for p in text.split(",")]
    if not method or "=" in method:
        raise ValueError(f"--merge starts with the method (e.g. ties,density=0.5), got {text!r}")
    options = pb.MergeOptions(method=method)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in _OPTION_TYPES:
            raise ValueError(f"--merge option {pair!r}: expected one of {', '.join(f'{k}=...' for k in _OPTION_TYPES)}")
        try:
            setattr(options, key, _OPTION_TYPES[key](value))
        except ValueError:
            raise ValueError(f"--merge option {key} takes a {_OPTION_TYPES[key].__name__}, got {value!r}") from None
    return options
