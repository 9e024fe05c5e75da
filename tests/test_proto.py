"""The committed gRPC stubs are exactly what grpcio-tools builds from proto/ now."""
from __future__ import annotations

from runtime.proto import build_stubs


def test_committed_stubs_match_the_proto(tmp_path):
    build_stubs.generate(tmp_path)
    for rel in build_stubs.generated_files():
        built = (tmp_path / rel).read_text()
        committed = (build_stubs.STUB_ROOT / rel).read_text()
        assert built == committed, f"runtime/proto/{rel} is stale: run `python -m runtime.proto.build_stubs`"


def test_stubs_import_as_a_package():
    from runtime.proto.adapterhub.v1 import runtime_pb2, runtime_pb2_grpc

    service = runtime_pb2.DESCRIPTOR.services_by_name["Runtime"]
    assert {m.name for m in service.methods} >= {
        "Generate", "GenerateStream", "Score", "LoadAdapter", "UnloadAdapter", "ListAdapters", "GetInfo"
    }
    assert runtime_pb2.DESCRIPTOR.name == "adapterhub/v1/runtime.proto"
    assert hasattr(runtime_pb2_grpc, "RuntimeStub")
