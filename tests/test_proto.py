"""The committed gRPC stubs are exactly what grpcio-tools builds from proto/ now."""
from __future__ import annotations

from runtime.proto import generate


def test_committed_stubs_match_the_proto(tmp_path):
    generate.generate(tmp_path)
    for rel in generate.generated_files():
        built = (tmp_path / rel).read_text()
        committed = (generate.STUB_ROOT / rel).read_text()
        assert built == committed, f"runtime/proto/{rel} is stale: run `python -m runtime.proto.generate`"


def test_stubs_import_as_a_package():
    from runtime.proto.adapterhub.v1 import runtime_pb2, runtime_pb2_grpc

    service = runtime_pb2.DESCRIPTOR.services_by_name["Runtime"]
    assert {m.name for m in service.methods} >= {
        "Generate", "GenerateStream", "Score", "LoadAdapter", "UnloadAdapter", "ListAdapters", "GetInfo"
    }
    assert runtime_pb2.DESCRIPTOR.name == "adapterhub/v1/runtime.proto"
    assert hasattr(runtime_pb2_grpc, "RuntimeStub")
