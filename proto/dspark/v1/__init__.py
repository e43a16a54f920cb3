"""Generated protobuf/gRPC modules for the dspark.v1 wire contract.

The `*_pb2*.py` files are built from the `.proto` files beside this one (by the install, or here on
first import when missing or older than their source); they are never edited by hand.
"""

from pathlib import Path as _Path

from dspark.protogen import ensure_generated as _ensure_generated

_ensure_generated(_Path(__file__).parent)
