"""runtime/fanout.py: the replies of every replica to LoadAdapter, UnloadAdapter and ListAdapters as one answer
(the cluster tests send them through real replicas; these cover the cases a live cluster cannot stage at will)."""
from __future__ import annotations

import pytest

from runtime.fanout import REPLICAS_KEY, Part, combine, merged_list
from runtime.proto.adapterhub.v1 import runtime_pb2 as pb


def load_part(replica: str, seconds: float) -> Part:
    reply = pb.LoadAdapterResponse(adapter=pb.AdapterInfo(ref="a@1.0.0"), load_seconds=seconds)
    return Part(replica, reply.SerializeToString())


LOAD_A = pb.LoadAdapterRequest(ref="a").SerializeToString()


def test_all_replicas_agree_one_answer_naming_them():
    answer = combine("LoadAdapter", LOAD_A, [load_part("r2", 0.5), load_part("r1", 0.0)])
    assert answer.code == "OK" and dict(answer.metadata)[REPLICAS_KEY] == "r1,r2"
    assert pb.LoadAdapterResponse.FromString(answer.payload).load_seconds == 0.5  # the slowest replica's


def test_a_failure_on_some_replicas_names_each_replica_and_what_it_answered():
    parts = [load_part("r1", 0.1), Part("r2", None, "RESOURCE_EXHAUSTED", "no room for adapter a@1.0.0"),
             Part("", None, "UNAVAILABLE", "the replica stopped during the call (actor died)")]
    answer = combine("LoadAdapter", LOAD_A, parts)
    assert answer.code == "UNAVAILABLE" and answer.payload is None
    assert answer.details == ("LoadAdapter 'a' failed on 2 of 3 replicas: replica (unknown): UNAVAILABLE: the "
                              "replica stopped during the call (actor died); replica r2: RESOURCE_EXHAUSTED: no room "
                              "for adapter a@1.0.0; it succeeded on replica(s) r1")


def test_the_same_refusal_everywhere_is_one_servers_refusal():
    parts = [Part(r, None, "NOT_FOUND", "adapter 'a' not found") for r in ("r1", "r2")]
    answer = combine("UnloadAdapter", pb.UnloadAdapterRequest(ref="a").SerializeToString(), parts)
    assert (answer.code, answer.details) == ("NOT_FOUND", "adapter 'a' not found")


def test_no_replica_is_unavailable():
    assert combine("ListAdapters", b"", []).code == "UNAVAILABLE"


def info(ref: str, **kwargs) -> pb.AdapterInfo:
    return pb.AdapterInfo(ref=ref, **kwargs)


def test_an_adapter_on_several_replicas_is_one_entry():
    pages = [pb.ListAdaptersResponse(adapters=[info("a@1", tier=pb.TIER_HOST, requests_served=2, in_use=1,
                                                    last_used_unix=5.0)], device_budget_bytes=10, device_used_bytes=1),
             pb.ListAdaptersResponse(adapters=[info("a@1", tier=pb.TIER_DEVICE, requests_served=3, pinned=True,
                                                    last_used_unix=4.0)], device_budget_bytes=10, device_used_bytes=2)]
    reply = merged_list(pb.ListAdaptersRequest(), pages)
    (a,) = reply.adapters
    assert (a.tier, a.requests_served, a.in_use, a.pinned, a.last_used_unix) == (pb.TIER_DEVICE, 5, 1, True, 5.0)
    assert (reply.device_budget_bytes, reply.device_used_bytes, reply.next_page_token) == (20, 3, "")


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_pages_of_the_merged_list_cover_every_adapter_once(size):
    """Replicas holding overlapping sets, each paging as the runtime's ListAdapters does."""
    held = [["a", "c", "d", "f", "g"], ["b", "c", "e", "h"], ["a"]]

    def replica_page(refs: list[str], request: pb.ListAdaptersRequest) -> pb.ListAdaptersResponse:
        after = [r for r in refs if r > request.page_token]
        page = after[:request.page_size]
        return pb.ListAdaptersResponse(adapters=[info(r) for r in page],
                                       next_page_token=page[-1] if len(after) > request.page_size else "")

    seen, token = [], ""
    for _ in range(20):
        request = pb.ListAdaptersRequest(page_size=size, page_token=token)
        reply = merged_list(request, [replica_page(refs, request) for refs in held])
        assert 0 < len(reply.adapters) <= size
        seen += [a.ref for a in reply.adapters]
        token = reply.next_page_token
        if not token:
            break
    assert seen == sorted({r for refs in held for r in refs})
