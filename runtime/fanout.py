"""One answer from every replica's: the adapter-management calls that `hub serve --replicas` sends to all replicas.

LoadAdapter and UnloadAdapter change what a replica holds, so the cluster endpoint sends them to every replica
(runtime/cluster.py) and answers as one server would: the same answer when all agree, else the failure with
each replica's part named. ListAdapters answers for the whole cluster: one entry per adapter, its best tier,
its counts summed. Pure functions over the replicas' replies (no Ray), so they are tested alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from runtime.proto.adapterhub.v1 import runtime_pb2 as pb
from runtime.service import MAX_PAGE_SIZE

REPLICAS_KEY = "x-replica-ids"  # trailing metadata of a fanned-out call: the replicas that answered it, comma-separated


@dataclass(frozen=True)
class Part:
    """One replica's reply to a fanned-out call: the response bytes, or a status code and message."""

    replica: str  # the replica's id ("" when it died before naming itself)
    payload: bytes | None
    code: str = "OK"
    details: str = ""


@dataclass(frozen=True)
class Reply:
    """A replica's answer to one call (or one chunk of a stream), or the cluster's combined answer: the
    response bytes, or a status; and the metadata to send with it."""

    payload: bytes | None
    code: str = "OK"
    details: str = ""
    metadata: tuple[tuple[str, str], ...] = ()


def combine(method: str, request: bytes, parts: list[Part]) -> Reply:
    """The answer to `method` from every replica's part (sorted by replica, so answers do not depend on the
    order they came in)."""
    parts = sorted(parts, key=lambda p: p.replica)
    named = ((REPLICAS_KEY, ",".join(p.replica for p in parts if p.replica)),)
    failed = [p for p in parts if p.code != "OK"]
    if not parts:
        return Reply(None, "UNAVAILABLE", "no replica is running; retry when Serve has started one", named)
    if failed:
        return _failure(method, request, parts, failed, named)
    if method == "ListAdapters":
        return Reply(merged_list(pb.ListAdaptersRequest.FromString(request),
                                    [pb.ListAdaptersResponse.FromString(p.payload or b"") for p in parts]
                                    ).SerializeToString(), metadata=named)
    if method == "LoadAdapter":  # the slowest replica's load time: the call took that long
        replies = [pb.LoadAdapterResponse.FromString(p.payload or b"") for p in parts]
        slowest = max(replies, key=lambda r: r.load_seconds)
        return Reply(slowest.SerializeToString(), metadata=named)
    return Reply(parts[0].payload, metadata=named)


def _failure(method: str, request: bytes, parts: list[Part], failed: list[Part], named) -> Reply:
    """All failed alike: that failure, as one server gives it. Else the first failure's code, with what each
    replica answered, so the operator knows which replicas now differ."""
    if len(failed) == len(parts) and len({(p.code, p.details) for p in failed}) == 1:
        return Reply(None, failed[0].code, failed[0].details, named)
    what = method
    if method in ("LoadAdapter", "UnloadAdapter"):
        kind = pb.LoadAdapterRequest if method == "LoadAdapter" else pb.UnloadAdapterRequest
        what = f"{method} {kind.FromString(request).ref!r}"
    done = [p.replica for p in parts if p.code == "OK"]
    each = "; ".join(f"replica {p.replica or '(unknown)'}: {p.code}: {p.details}" for p in failed)
    tail = f"; it succeeded on replica(s) {', '.join(done)}" if done else ""
    return Reply(None, failed[0].code, f"{what} failed on {len(failed)} of {len(parts)} replicas: {each}{tail}",
                    named)


_TIER_ORDER = {pb.TIER_DEVICE: 0, pb.TIER_HOST: 1, pb.TIER_DISK: 2, pb.TIER_UNSPECIFIED: 3}


def merged_list(request: pb.ListAdaptersRequest, pages: list[pb.ListAdaptersResponse]) -> pb.ListAdaptersResponse:
    """The replicas' pages of ListAdapters as one page of the cluster's list.

    Each replica answered the same request: its entries after `page_token`, in ref order, up to the page size.
    A replica with more to come has given every entry of its own up to its last one, but not past it; so the
    merged page ends at the earliest such last ref, and the next page starts after what this one gave."""
    size = request.page_size if 0 < request.page_size <= MAX_PAGE_SIZE else MAX_PAGE_SIZE
    cut = min((p.adapters[-1].ref for p in pages if p.next_page_token and p.adapters), default=None)
    by_ref: dict[str, pb.AdapterInfo] = {}
    for page in pages:
        for info in page.adapters:
            if cut is None or info.ref <= cut:
                by_ref[info.ref] = _merged(by_ref[info.ref], info) if info.ref in by_ref else info
    refs = sorted(by_ref)
    page = refs[:size]
    more = len(refs) > size or cut is not None
    return pb.ListAdaptersResponse(adapters=[by_ref[r] for r in page],
                                   device_budget_bytes=sum(p.device_budget_bytes for p in pages),
                                   device_used_bytes=sum(p.device_used_bytes for p in pages),
                                   next_page_token=page[-1] if more and page else "")


def _merged(a: pb.AdapterInfo, b: pb.AdapterInfo) -> pb.AdapterInfo:
    """One adapter as held by two replicas: the nearer tier, pinned on either, the counts summed, the last use."""
    out = pb.AdapterInfo()
    out.CopyFrom(a)
    out.tier = min(a.tier, b.tier, key=_TIER_ORDER.__getitem__)
    out.size_bytes = max(a.size_bytes, b.size_bytes)
    out.pinned = a.pinned or b.pinned
    out.last_used_unix = max(a.last_used_unix, b.last_used_unix)
    out.requests_served = a.requests_served + b.requests_served
    out.in_use = a.in_use + b.in_use
    return out
