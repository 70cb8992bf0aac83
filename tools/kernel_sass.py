#!/usr/bin/env python3
"""What ptxas makes of the tensor-core step kernel, without a GPU: registers, spills, and the
order of its memory instructions, from nvcc (and cuobjdump where present) on this machine.

Why: on the H200 the folded epilogue's loads took 5-8 us of the merging threadgroup's path
(docs/BENCHMARKS.md, "The folded epilogue's loads"), where one round of loads should take one
memory round trip. The SASS showed why: ptxas had reused one register as the address and the
result of each tail load (a select between the old tail's array and the new token's per
element), so each load waited for the previous one. That is visible here, before any device
time is spent: a load whose destination register is the address register of the next load
serializes them.

The kernel is compiled as MLX's NVRTC build sees it, as nearly as nvcc allows: the same
generated body and header, the launch bounds' register cap given as -maxrregcount (the
header applies __launch_bounds__ under NVRTC only), sm_90.

    python3 tools/kernel_sass.py --form step-epilogue            # ptxas's registers and spills
    python3 tools/kernel_sass.py --form step-epilogue --after-barrier 3 --limit 80
        # the memory instructions after the 3rd barrier from the end of the merge (SASS)
Needs nvcc (and cuobjdump for the SASS: --cuobjdump PATH or on PATH; where the toolkit lacks
it, the `nvidia-cuda-cuobjdump` wheel carries one under nvidia/cu13/bin); says so and exits 2
without nvcc. The round trips are read from straight-line code: a loop's body counts once.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

FORMS = ("split", "step", "step-epilogue")
MEMORY = re.compile(r"\b(LDG|STG|LDS|STS|BAR|ATOMG|MEMBAR)\b")
BARRIER = re.compile(r"\bBAR\.")  # a threadgroup barrier (not MEMBAR, not DEPBAR)


# The kernels' argument dtypes for a bf16 model's decode step (Llama-3-8B's in the tools).
INPUT_TYPES = dict(queries="float32", key_codes="uint8", key_scales="float16",
                   value_codes="uint8", value_scales="float16", block_tables="int32",
                   seq_lens="int32", key_codebook="float32", value_codebook="float32",
                   params="int32", rotation="float32", scale="float32", arrivals="int32",
                   after="int32", tail_keys="float16", tail_values="float16",
                   new_keys="bfloat16", new_values="bfloat16", tail_info="int32",
                   key_center="float32", output_rotation="float32")
OUTPUT_TYPES = dict(work="float32", attn_out="bfloat16", next_tail_keys="float16",
                    next_tail_values="float16")
NVCC_PRELUDE = "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n#include <cstdint>"


def kernel_source(geo, body: str | None = None, prelude: str | None = NVCC_PRELUDE,
                  extra_outputs: tuple[tuple[str, str], ...] = ()) -> str:
    """A translation unit of `geo`'s fused split kernel (its body, or ``body``: an
    instrumented one) with the signature MLX generates from attention_kernel's interface:
    for nvcc with ``prelude``, for the repository's g++ shim with None."""
    from tests.metal.signature import full_source
    from tqstore.metal.attention_kernel import mma_kernel_interface
    from tqstore.metal.attention_mma import mma_attention_body

    inputs, outputs, header = mma_kernel_interface(geo, True)
    types = dict(INPUT_TYPES, queries="bfloat16") if geo.step else INPUT_TYPES  # the model's
    return full_source("cuda", "tq_step_kernel", header,
                       mma_attention_body(geo, True) if body is None else body,
                       [(n, types[n]) for n in inputs],
                       [(n, OUTPUT_TYPES[n]) for n in outputs] + list(extra_outputs),
                       prelude=prelude)


def register_cap(geo) -> int:
    """The registers a thread gets under the kernel's __launch_bounds__(threads, groups)
    (allocation granularity 8)."""
    from tqstore.metal.attention_kernel import SM_REGISTERS, mma_resident_groups
    return min(255, SM_REGISTERS // (geo.threads * mma_resident_groups(geo)) // 8 * 8)


def compile_cubin(source: str, cap: int, workdir: Path) -> tuple[Path, str]:
    """nvcc -cubin for sm_90 at the register cap: (the cubin, ptxas's resource lines)."""
    cu = workdir / "kernel.cu"
    cu.write_text(source)
    cubin = workdir / "kernel.cubin"
    res = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-O3", "-Xptxas", "-v",
                          f"-maxrregcount={cap}", "-o", str(cubin), str(cu)],
                         capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"nvcc failed:\n{res.stderr[-3000:]}")
    usage = [line.split("ptxas info    :")[-1].strip() for line in res.stderr.splitlines()
             if "registers" in line or "spill" in line]
    return cubin, "\n".join(usage)


def instructions(sass: str) -> list[tuple[str, str]]:
    """The SASS's instructions in program order: (offset, text without the encoding)."""
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*(.*?);", line)
        if m:
            out.append((m.group(1), m.group(2).strip()))
    return out


def _registers(text: str) -> set[str]:
    """The registers an instruction names (a .64 operand names its pair)."""
    regs = set()
    for num, wide in re.findall(r"\bR(\d+)(\.64)?\b", text):
        regs.add(f"R{num}")
        if wide:
            regs.add(f"R{int(num) + 1}")
    return regs


def load_regions(program: list[tuple[str, str]]) -> list[dict]:
    """Per stretch between barriers (straight-line reading, branches ignored): its global
    loads and the round trips they cost, counted as the instructions that touch a register
    a load in flight will write (each waits for that load; the loads issued before it are
    taken as back too)."""
    regions, loads, trips, pending, start = [], 0, 0, set(), program[0][0] if program else ""
    for offset, text in program:
        if BARRIER.search(text):
            regions.append(dict(start=start, end=offset, loads=loads, round_trips=trips))
            loads, trips, pending, start = 0, 0, set(), offset
            continue
        regs = _registers(text)
        if pending & regs:
            trips += 1
            pending = set()
        load = re.match(r"(@!?P\d\s+)?LDG(\S*)\s+R(\d+)", text)
        if load:
            loads += 1
            width = 4 if ".128" in load.group(2) else 2 if ".64" in load.group(2) else 1
            pending |= {f"R{int(load.group(3)) + k}" for k in range(width)}
    regions.append(dict(start=start, end=program[-1][0] if program else "", loads=loads,
                        round_trips=trips))
    return regions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--form", choices=FORMS, default="step-epilogue")
    ap.add_argument("--after-barrier", type=int, default=0,
                    help="list the memory instructions after the k-th-from-last barrier (0: "
                         "do not list)")
    ap.add_argument("--limit", type=int, default=60, help="instructions listed")
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump"))
    args = ap.parse_args()
    if shutil.which("nvcc") is None:
        print("needs nvcc (the CUDA toolkit's compiler) on PATH", file=sys.stderr)
        return 2
    from mma_phases import form_geometry
    geo = form_geometry(args.form)
    source, cap = kernel_source(geo), register_cap(geo)
    with tempfile.TemporaryDirectory() as tmp:
        cubin, usage = compile_cubin(source, cap, Path(tmp))
        print(f"{args.form}: sm_90, -maxrregcount={cap}: {usage.replace(chr(10), '; ')}")
        if not args.cuobjdump:
            print("no cuobjdump (--cuobjdump PATH): SASS not listed")
            return 0
        sass = subprocess.run([args.cuobjdump, "-sass", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    program = instructions(sass)
    regions = [r for r in load_regions(program) if r["loads"]]
    print(f"{len(program)} instructions, {sum(r['loads'] for r in regions)} global loads; "
          "per stretch between barriers with loads: offsets, loads, round trips")
    for r in regions:
        print(f"  {r['start']}-{r['end']}: {r['loads']:4d} loads {r['round_trips']:4d} round trips")
    if args.after_barrier:
        barriers = [k for k, (_, text) in enumerate(program) if BARRIER.search(text)]
        first = barriers[-args.after_barrier] if len(barriers) >= args.after_barrier else 0
        listed = [(o, t) for o, t in program[first:] if MEMORY.search(t)][:args.limit]
        for offset, text in listed:
            print(f"  {offset} {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
