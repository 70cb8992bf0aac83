"""The committed generated code matches proto/tqstore/v1/tqstore.proto."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    str(ROOT / "proto/tqstore/v1/tqstore.proto")], check=True)
    for name in ("tqstore_pb2.py", "tqstore_pb2.pyi", "tqstore_pb2_grpc.py"):
        assert (tmp_path / "tqstore/v1" / name).read_text() == (ROOT / "tqstore/v1" / name).read_text(), \
            f"{name} is stale: run tools/gen_proto.sh"
