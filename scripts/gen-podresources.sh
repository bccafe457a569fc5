#!/usr/bin/env bash
# Regenerate the Python modules for the kubelet pod-resources v1 API from
# exporter/podresources/api.proto (api_pb2.py, api_pb2.pyi, api_pb2_grpc.py).
#
# Idempotent: the same proto and the same grpcio-tools give byte-identical output.
# Needs grpcio-tools (pip install grpcio-tools); run from anywhere:
#   scripts/gen-podresources.sh            # uses .venv/bin/python if present
#   PYTHON=python3 scripts/gen-podresources.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

pkg=exporter/podresources
# The include root is the repository root, so the proto is compiled under its package path:
# the generated gRPC module then imports `from exporter.podresources import api_pb2` (no sed
# needed), and the file registers in protobuf's process-wide descriptor pool as
# "exporter/podresources/api.proto" rather than a bare "api.proto", which another library's
# generated code could also claim (a duplicate file name fails at import time).
"$PYTHON" -m grpc_tools.protoc \
    -I . \
    --python_out=. \
    --pyi_out=. \
    --grpc_python_out=. \
    "$pkg/api.proto"

echo "regenerated $pkg/api_pb2.py, api_pb2.pyi, api_pb2_grpc.py"
