"""Write kernel sources the way MLX's custom-kernel API assembles them (its signature
generators for Metal and CUDA, mlx 0.32), so a C++ compiler can check them on CI."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tqstore.metal.dialect import element_type

HERE = Path(__file__).parent

# MLX's Metal attribute list: a parameter is added when the body mentions its name.
METAL_ATTRIBUTES = [
    ("simdgroup_index_in_threadgroup", "uint"), ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"), ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"), ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"), ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"), ("threads_per_threadgroup", "uint3"),
]


def full_source(dialect: str, name: str, header: str, body: str,
                inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
                prelude: str | None = None) -> str:
    """inputs/outputs: (name, dtype name). Returns a translation unit for the shim compile
    (`prelude` replaces the shim include: nvcc's real headers, or the CPU emulator)."""
    shim = HERE / f"{dialect}_shim.h"
    lines = [prelude if prelude is not None else f'#include "{shim}"', header]
    if dialect == "metal":
        params = [f"  const device {element_type(dialect, t)}* {n} [[buffer({i})]]"
                  for i, (n, t) in enumerate(inputs)]
        params += [f"  device {element_type(dialect, t)}* {n} [[buffer({len(inputs) + i})]]"
                   for i, (n, t) in enumerate(outputs)]
        params += [f"  {t} {a} [[{a}]]" for a, t in METAL_ATTRIBUTES if a in body]
        lines.append(f"[[kernel]] void custom_kernel_{name}(\n" + ",\n".join(params) + ") {")
    else:
        params = [f"    const {element_type(dialect, t)}* {n}" for n, t in inputs]
        params += [f"    {element_type(dialect, t)}* {n}" for n, t in outputs]
        lines.append("namespace mlx { namespace core { namespace cu {")
        lines.append(f"__global__ void {name}(\n" + ",\n".join(params) + ") {")
    lines.append(body)
    lines.append("}")
    if dialect == "cuda":
        lines.append("}}}")
    return "\n".join(lines) + "\n"


def syntax_check(source: str, tmp_path: Path, stem: str, extra: list[str] | None = None) -> None:
    """Compile with g++ -fsyntax-only; raise AssertionError with the diagnostics."""
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    assert cxx, "a C++ compiler is needed for the kernel syntax check"
    path = tmp_path / f"{stem}.cpp"
    path.write_text(source)
    res = subprocess.run([cxx, "-fsyntax-only", "-std=c++17", "-Wall", "-Werror",
                          "-Wno-unused-variable", "-Wno-unused-but-set-variable",
                          "-Wno-attributes", "-Wno-unknown-pragmas", *(extra or []), str(path)],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"{stem} failed the {cxx} syntax check:\n{res.stderr[-4000:]}"
