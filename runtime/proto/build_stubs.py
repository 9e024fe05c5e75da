"""Regenerate the committed gRPC stubs from proto/ with grpcio-tools.

protoc is run with `-I proto`, so the descriptor keeps the path `adapterhub/v1/runtime.proto`
(what reflection clients see); the one absolute import protoc writes into the *_grpc module is
then rewritten to live under `runtime.proto`, so the stubs import as an ordinary subpackage with
no sys.path tricks. tests/test_proto.py regenerates into a temp dir and compares.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO_FILES = ("adapterhub/v1/runtime.proto", "adapterhub/v1/cluster.proto")
STUB_ROOT = Path(__file__).resolve().parent
PACKAGE = "runtime.proto"


def generated_files() -> list[str]:
    """Paths (relative to the stub root) of every file protoc writes."""
    out = []
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        out += [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
    return out


def generate(out_dir: Path = STUB_ROOT) -> None:
    """Write the stubs for PROTO_FILES under out_dir (plus empty package __init__ files)."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
        f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    for proto in PROTO_FILES:
        module = proto.removesuffix(".proto").replace("/", ".")
        parent, _, leaf = module.rpartition(".")
        grpc_file = out_dir / f"{proto.removesuffix('.proto')}_pb2_grpc.py"
        text = grpc_file.read_text()
        grpc_file.write_text(text.replace(f"from {parent} import {leaf}_pb2", f"from {PACKAGE}.{parent} import {leaf}_pb2"))
        package_dir = (out_dir / proto).parent
        while package_dir != out_dir:
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else STUB_ROOT)
