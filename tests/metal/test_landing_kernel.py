"""The upload landing's CUDA kernels (tqstore.upload_landing) on the CPU emulator
(tests/metal/cuda_emu.h), with the signature MLX generates: every head's [start, stop) token
rows land at the destination address the params carry, by 16-byte words where addresses and
rows allow and byte by byte elsewhere, and the signal kernel then writes the token into the
flag word. The GPU suite runs the real thing (tests/test_upload_landing.py on CUDA)."""

import shutil
import subprocess

import numpy as np
import pytest

from tests.metal.signature import HERE, full_source
from tqstore.upload_landing import _LAND_SOURCE, _SIGNAL_SOURCE

_MAIN = """
#include <fstream>
static std::vector<char> rd(const char* p) { std::ifstream f(p, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), {}); }
int main() {
  auto raw = rd("src.bin");
  std::vector<unsigned char> src(raw.size() + 64);
  unsigned char* source = src.data() + SHIFT;  // SHIFT 0: 16-byte aligned (new[] is)
  std::memcpy(source, raw.data(), raw.size());
  std::vector<unsigned char> dst(OUT_BYTES + 64, 0xAB);
  unsigned long long flag = 0;
  const uint64_t land_params[6] = {(uint64_t)dst.data(), HEADS, TOKENS, START, STOP, ROW};
  uint32_t zero = 0, done = 7;
  tq_emu::launch(dim3{3, 1, 1}, 32, [&] { mlx::core::cu::land((const __half*)source,
      land_params, &zero, &done); });
  const uint64_t signal_params[2] = {(uint64_t)&flag, 4242};
  uint32_t signalled = 7;
  tq_emu::launch(dim3{1, 1, 1}, 1, [&] { mlx::core::cu::signal(signal_params, &done,
      &signalled); });
  std::ofstream("dst.bin", std::ios::binary).write((const char*)dst.data(), dst.size());
  std::ofstream("flag.bin", std::ios::binary).write((const char*)&flag, 8);
  return 0;
}
"""


@pytest.mark.parametrize("dim, shift, start, stop", [
    (64, 0, 4, 9), (12, 0, 4, 9), (64, 2, 4, 9), (64, 0, 0, 11), (12, 0, 0, 11)],
    ids=["words", "rows-of-24-bytes", "unaligned-source", "words-whole", "bytes-whole"])
def test_the_landing_kernel_copies_every_heads_rows_and_then_the_signal_sets_the_flag(
        rng, tmp_path, dim, shift, start, stop):
    cxx = shutil.which("g++")
    assert cxx, "g++ is needed for the emulated kernel run"
    heads, tokens = 3, 11
    source = rng.standard_normal((1, heads, tokens, dim)).astype(np.float16)
    source.tofile(tmp_path / "src.bin")
    want = np.ascontiguousarray(source[0, :, start:stop])
    land = full_source("cuda", "land", "", _LAND_SOURCE,
                       [("source", "float16"), ("params", "uint64"), ("after", "uint32")],
                       [("done", "uint32")], prelude="")
    signal = full_source("cuda", "signal", "", _SIGNAL_SOURCE,
                         [("params", "uint64"), ("after", "uint32")], [("done", "uint32")],
                         prelude="")
    consts = dict(SHIFT=shift, OUT_BYTES=want.nbytes, HEADS=heads, TOKENS=tokens, START=start,
                  STOP=stop, ROW=dim * 2)
    defines = "".join(f"#define {k} {v}\n" for k, v in consts.items())
    (tmp_path / "emu.cpp").write_text('#include "cuda_emu.h"\n' + land + signal + defines + _MAIN)
    built = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", f"-I{HERE}", "-w",
                            str(tmp_path / "emu.cpp"), "-o", str(tmp_path / "emu")],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    ran = subprocess.run([str(tmp_path / "emu")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    dst = np.fromfile(tmp_path / "dst.bin", np.uint8)
    assert dst[:want.nbytes].tobytes() == want.tobytes()
    assert (dst[want.nbytes:] == 0xAB).all()  # nothing past the slice is written
    assert int(np.fromfile(tmp_path / "flag.bin", np.uint64)[0]) == 4242
