"""Run the generated CUDA attention kernels on the CPU through tests/metal/cuda_emu.h: the
kernel bodies exactly as MLX would compile them (same signature generator), a thread per GPU
thread, warp collectives emulated. Used by CI to check the MMA kernel's fragment layouts and
the split/merge logic without a GPU (the GPU bench checks the real thing)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from tests.metal.signature import HERE, full_source
from tqstore.metal.attention_kernel import choose_num_splits, geometry_for
from tqstore.metal.attention_mma import (STEP_ATTN_INPUTS, MmaGeometry, mma_attention_body,
                                         mma_header)
from tqstore.metal.epilogue import out_define
from tqstore.metal.mma_epilogue import EPILOGUE_INPUTS, EPILOGUE_OUTPUTS
from tqstore.metal.mma_merge import fused_layout
from tqstore.metal.attention_source import (ATTN_INPUTS, MERGE_INPUTS, attention_body,
                                            merge_body)

ATTN_TYPES = dict(queries="float32", rotation="float32", scale="float32", arrivals="int32",
                  after="float16",
                  key_codes="uint8", key_scales="float16",
                  value_codes="uint8", value_scales="float16", block_tables="int32",
                  seq_lens="int32", key_codebook="float32", value_codebook="float32",
                  params="int32",
                  # the folded epilogue's (tqstore.metal.mma_epilogue; the model's dtype float32)
                  tail_keys="float16", tail_values="float16", new_keys="float32",
                  new_values="float32", tail_info="int32", key_center="float32",
                  output_rotation="float32")
OUT_TYPES = dict(next_tail_keys="float16", next_tail_values="float16")  # others float32
_NP = dict(float32=np.float32, uint8=np.uint8, float16=np.float16, int32=np.int32)


def _kernel(name: str, body: str, inputs: list[str], types: dict, outputs: list[str]) -> str:
    return full_source("cuda", name, "", body, [(n, types[n]) for n in inputs],
                       [(o, OUT_TYPES.get(o, "float32")) for o in outputs], prelude="")


def run_emulated(pages: dict, kind: str, num_splits: int | None, tmp: Path,
                 warps: int = 4, depth: int = 1, fused: bool = True,
                 reverse: bool = False, step: dict | None = None,
                 launches: int = 1, epilogue: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(out (B, Hq, Dv), lse (B, Hq)) float32 from the `kind` ('mma' or 'portable') CUDA
    kernels on the emulator. MMA split-K: merged in the split launch (`fused`, the default
    plan) or by the separate merge pass; `reverse` runs the splits' threadgroups last to first
    (so another threadgroup does the fused merge).

    ``step``: the MMA kernel's step form (MmaGeometry.step) with these inputs in place of
    pages["queries"]: queries (B, Hq, 1, Dk) float32, rotation (Hkv, Dk, Dk), scale. It runs
    ``launches`` times on the same arrival counters (zero before the first), its work buffer
    refilled with NaNs before each (no zero-fill: nothing unwritten may be read). Returns the
    last launch's outputs; every launch's are in out_<k>.bin / lse_<k>.bin and the counters
    after the last in arrivals.bin.

    ``epilogue`` (with ``step``): the per-row epilogue folded in (MmaGeometry.epilogue,
    tqstore.metal.mma_epilogue; the model's dtype float32) with these inputs
    (mma_epilogue.EPILOGUE_INPUTS). Its outputs, garbage (0xFF bytes) before each launch, are
    in attn_out.bin, next_tail_keys.bin, next_tail_values.bin (float32, fp16, fp16), and per
    launch in <name>_<k>.bin for split-K."""
    cxx = shutil.which("g++")
    assert cxx, "g++ is needed for the emulated kernel run"
    q, kc, vc = pages["queries"], pages["key_codes"], pages["value_codes"]
    bsz, hq, dk = q.shape
    _, hkv, bs, vbytes = vc.shape
    dv = vbytes * 8 // pages["value_bits"]
    max_blocks = pages["block_tables"].shape[1]
    nsplit = num_splits or choose_num_splits(bsz, hkv, max_blocks * bs)
    if kind == "mma":
        geo = MmaGeometry(dk, dv, bs, hq, hkv, warps=warps, depth=depth, fused=fused,
                          step=step is not None,
                          epilogue=None if epilogue is None else "float32")
        body = lambda split: mma_attention_body(geo, split)  # noqa: E731
        threads = geo.threads
    else:
        geo = geometry_for(q, kc, vc, pages["key_bits"], pages["value_bits"])
        body = lambda split: attention_body(geo, "cuda", split)  # noqa: E731
        threads = geo.threads
    split = nsplit > 1
    fused = kind == "mma" and fused and split
    outs = (["work"] if fused else ["partial_out", "partial_m", "partial_l"]) if split \
        else ["out", "lse"]
    inputs = list(STEP_ATTN_INPUTS if step is not None else ATTN_INPUTS)
    header = mma_header(activations=step is not None)
    if epilogue is not None:
        inputs += EPILOGUE_INPUTS
        header += out_define("cuda", "float32")
    src = ['#include "cuda_emu.h"', header,
           _kernel("attn", body(split), inputs, ATTN_TYPES,
                   outs + (list(EPILOGUE_OUTPUTS) if epilogue is not None else []))]
    if split and not fused:
        src.append(_kernel("merge", merge_body(dv, hq, "cuda"), list(MERGE_INPUTS),
                           dict(partial_out="float32", partial_m="float32",
                                partial_l="float32", params="int32"), ["out", "lse"]))
    arrays = dict(pages)
    arrays["params"] = np.array([max_blocks, nsplit], dtype=np.int32)
    if step is not None:
        arrays.update(queries=step["queries"], rotation=step["rotation"],
                      scale=np.array([step["scale"]], np.float32),
                      arrivals=np.zeros(bsz * hkv, np.int32), after=np.zeros(8, np.float16))
    if epilogue is not None:
        arrays.update(epilogue)
    for name in inputs:
        np.ascontiguousarray(np.array(arrays[name]).astype(_NP[ATTN_TYPES[name]])).tofile(
            tmp / f"{name}.bin")
    args = ", ".join(f"({'const __half' if ATTN_TYPES[n] == 'float16' else _ctype(ATTN_TYPES[n])}*)"
                     f"in_{n}.data()" for n in inputs)
    npart = bsz * hq * nsplit
    # The folded epilogue's outputs follow the kernel's own in every launch call.
    eouts = "".join(f", {o}.data()" for o in EPILOGUE_OUTPUTS) if epilogue is not None else ""
    esizes = dict(attn_out=bsz * hq * dv, next_tail_keys=bsz * hkv * bs * dk,
                  next_tail_values=bsz * hkv * bs * dv)
    etypes = dict(attn_out="float", next_tail_keys="__half", next_tail_values="__half")
    garbage = "".join(f" std::memset((void*){o}.data(), 0xFF, {o}.size() * sizeof({o}[0]));"
                      for o in EPILOGUE_OUTPUTS) if epilogue is not None else ""
    keep = "".join(f' std::ofstream("{o}_" + std::to_string(rep) + ".bin", std::ios::binary)'
                   f'.write((const char*){o}.data(), {o}.size() * sizeof({o}[0]));'
                   for o in EPILOGUE_OUTPUTS) if epilogue is not None else ""
    main = [
        "#include <algorithm>",
        "#include <limits>",
        "#include <string>",
        "#include <cstring>",
        "#include <fstream>",
        "static std::vector<char> rd(const char* p) { std::ifstream f(p, std::ios::binary);"
        " return std::vector<char>(std::istreambuf_iterator<char>(f), {}); }",
        "int main() {",
        *[f'  auto in_{n} = rd("{n}.bin");' for n in inputs],
        f"  std::vector<float> out({bsz * hq * dv}), lse({bsz * hq}), partial_out({npart * dv}),"
        f" partial_m({npart}), partial_l({npart});",
        *([f"  std::vector<{etypes[o]}> {o}({esizes[o]});" for o in EPILOGUE_OUTPUTS]
          if epilogue is not None else []),
    ]
    lse_at, _, work_size = fused_layout(bsz, hq, hkv, dv, nsplit)
    # The step form's work buffer is not zero-filled: garbage (NaN) must never be read.
    fill = "std::numeric_limits<float>::quiet_NaN()" if step is not None else "0.0f"
    if fused:
        main += [
            f"  std::vector<float> work({work_size});  // MLX: init_value=0 (not the step form)",
            f"  for (int rep = 0; rep < {launches}; ++rep) {{",
            f"    std::fill(work.begin(), work.end(), {fill});{garbage}",
            f"    tq_emu::launch(dim3{{{nsplit}, {hkv}, {bsz}}}, {threads}, [&] {{ "
            f"mlx::core::cu::attn({args}, work.data(){eouts}); }});{keep}",
            f"    std::copy(work.begin(), work.begin() + {lse_at}, out.begin());",
            f"    std::copy(work.begin() + {lse_at}, work.begin() + {lse_at + bsz * hq}, "
            f"lse.begin());",
            '    std::ofstream("out_" + std::to_string(rep) + ".bin", std::ios::binary)'
            '.write((const char*)out.data(), out.size() * 4);',
            '    std::ofstream("lse_" + std::to_string(rep) + ".bin", std::ios::binary)'
            '.write((const char*)lse.data(), lse.size() * 4);',
            "  }",
        ]
    elif split:
        main += [
            f"  tq_emu::launch(dim3{{{nsplit}, {hkv}, {bsz}}}, {threads}, [&] {{ mlx::core::cu::attn("
            f"{args}, partial_out.data(), partial_m.data(), partial_l.data()); }});",
            f"  tq_emu::launch(dim3{{1, {hq}, {bsz}}}, {dv}, [&] {{ mlx::core::cu::merge("
            f"partial_out.data(), partial_m.data(), partial_l.data(), (const int32_t*)in_params.data(),"
            f" out.data(), lse.data()); }});",
        ]
    else:
        main.append(f" {garbage} tq_emu::launch(dim3{{1, {hkv}, {bsz}}}, {threads}, [&] {{"
                    f" mlx::core::cu::attn({args}, out.data(), lse.data(){eouts}); }});")
    if step is not None:
        main.append('  std::ofstream("arrivals.bin", std::ios::binary).write('
                    'in_arrivals.data(), in_arrivals.size());')
    main += [f'  std::ofstream("{o}.bin", std::ios::binary).write((const char*){o}.data(),'
             f' {o}.size() * sizeof({o}[0]));' for o in EPILOGUE_OUTPUTS] if epilogue is not None else []
    main += ['  std::ofstream("out.bin", std::ios::binary).write((const char*)out.data(),'
             ' out.size() * 4);',
             '  std::ofstream("lse.bin", std::ios::binary).write((const char*)lse.data(),'
             ' lse.size() * 4);', "  return 0;", "}"]
    src.append("\n".join(main))
    cpp = tmp / "emu.cpp"
    cpp.write_text("\n".join(src))
    exe = tmp / "emu"
    # No FMA contraction: float32 sums then round as numpy's do on every CPU (the step form's
    # rotation is compared bit for bit with numpy's; NVRTC contracts, GPU self-checks judge
    # that build against the reference within tolerance).
    res = subprocess.run([cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-pthread",
                          f"-I{HERE}", "-w",
                          f"-DTQ_EMU_REVERSE_X={int(reverse)}", str(cpp),
                          "-o", str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, f"emulator build failed:\n{res.stderr[-4000:]}"
    res = subprocess.run([str(exe)], cwd=tmp, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"emulated run failed:\n{res.stderr[-2000:]}"
    return (np.fromfile(tmp / "out.bin", dtype=np.float32).reshape(bsz, hq, dv),
            np.fromfile(tmp / "lse.bin", dtype=np.float32).reshape(bsz, hq))


def _ctype(dtype: str) -> str:
    return dict(float32="float", uint8="uint8_t", int32="int32_t")[dtype]
