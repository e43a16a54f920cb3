"""Builds the Python modules of the wire contract from proto/dspark/v1/*.proto with grpc_tools."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def _stale(proto_dir: Path) -> bool:
    protos = sorted(proto_dir.glob("*.proto"))
    for proto in protos:
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            out = proto.with_name(proto.stem + suffix)
            if not out.exists() or out.stat().st_mtime < proto.stat().st_mtime:
                return True
    return False


def ensure_generated(proto_dir: Path) -> None:
    if not _stale(proto_dir):
        return
    import grpc_tools
    from grpc_tools import protoc

    root = proto_dir.parent.parent  # .../proto, so imports read "dspark/v1/x.proto"
    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = [str(p.relative_to(root)) for p in sorted(proto_dir.glob("*.proto"))]
    # Generate into a temporary folder and move into place, so a concurrent importer never sees
    # a half-written module.
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        rc = protoc.main(["protoc", f"-I{root}", f"-I{include}", f"--python_out={tmp}",
                          f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos])
        if rc != 0:
            raise RuntimeError(f"protoc failed ({rc}) on {protos}")
        for out in (Path(tmp) / "dspark" / "v1").iterdir():
            os.replace(out, proto_dir / out.name)


if __name__ == "__main__":
    ensure_generated(Path(__file__).parent / "v1")
    print("generated", file=sys.stderr)
