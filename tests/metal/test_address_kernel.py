"""The upload landing's address kernel (tqstore.upload_landing._ADDRESS_SOURCE) on the CPU
emulator (tests/metal/cuda_emu.h), with the signature MLX generates: one thread writes the
source pointer it is given into the uint64 output, and the other threads write nothing. The
GPU suite runs the real thing (tests/test_upload_landing.py on CUDA: the copy engine's bytes
come back bit for bit, which needs every address right)."""

import shutil
import subprocess

from tests.metal.signature import HERE, full_source
from tqstore.upload_landing import _ADDRESS_SOURCE

_MAIN = """
#include <cstdio>
int main() {
  static __half source[64];
  uint64_t address[2] = {7, 7};
  tq_emu::launch(dim3{2, 1, 1}, 32, [&] { mlx::core::cu::address_of(source + 3, address); });
  std::printf("%d %d\\n", address[0] == (uint64_t)(source + 3), address[1] == 7);
  return 0;
}
"""


def test_the_address_kernel_writes_its_sources_pointer_once(tmp_path):
    cxx = shutil.which("g++")
    assert cxx, "g++ is needed for the emulated kernel run"
    kernel = full_source("cuda", "address_of", "", _ADDRESS_SOURCE, [("source", "float16")],
                         [("address", "uint64")], prelude="")
    (tmp_path / "emu.cpp").write_text('#include "cuda_emu.h"\n' + kernel + _MAIN)
    built = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", f"-I{HERE}", "-w",
                            str(tmp_path / "emu.cpp"), "-o", str(tmp_path / "emu")],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    ran = subprocess.run([str(tmp_path / "emu")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.split() == ["1", "1"]
