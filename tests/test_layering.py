"""Dependencies point one way (design.md, "The parts and which way they depend"):

  codec <- kernels (tqstore.metal) <- paged cache (tqstore.paged) <- client, generator
  store (tqstore.ssd) <- daemon;  client and daemon share only the wire contract and
  tqstore.blocks.

Checked in fresh interpreters, so what one test imported cannot hide what another loads: each
import must leave the forbidden modules out of sys.modules. The kernels are also checked in
their source (a function-local import runs only when that function does) and by running their
CPU path, which is where a function-local import of the paged cache used to hide.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METAL = ROOT / "tqstore" / "metal"
METAL_MODULES = ["tqstore.metal"] + sorted(
    f"tqstore.metal.{p.stem}" for p in METAL.glob("*.py") if p.stem != "__init__")

# Module name prefixes a part must not load (a prefix "x" matches "x" and "x.*").
NO_PAGED = ("tqstore.paged",)
NO_STORE = ("lmdb", "tqstore.ssd")
NO_UPPER = ("tqstore.paged", "tqstore.metal", "tqstore.ssd")


def _loaded(code: str, forbidden: tuple[str, ...]) -> list[str]:
    """Run code in a fresh interpreter; the forbidden modules it left in sys.modules."""
    probe = textwrap.dedent(code) + textwrap.dedent(f"""
        import json, sys
        bad = {forbidden!r}
        print(json.dumps(sorted(m for m in sys.modules
                                if any(m == b or m.startswith(b + ".") for b in bad))))
        """)
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", METAL_MODULES)
def test_kernel_modules_load_no_paged_cache(module: str) -> None:
    assert _loaded(f"import {module}", NO_PAGED) == []


@pytest.mark.parametrize("module", ["tqstore.client", "tqstore.generator", "tqstore.config",
                                    "tqstore.wire", "tqstore.blocks", "tqstore.direct_read",
                                    "tqstore.payload_format"])
def test_generator_side_loads_no_store(module: str) -> None:
    assert _loaded(f"import {module}", NO_STORE) == []


@pytest.mark.parametrize("module", ["tqstore.ssd", "tqstore.config"])
def test_store_and_config_load_no_mlx(module: str) -> None:
    """The store holds bytes and blocks (`tqstore check`, `inspect --path` start no MLX)."""
    assert _loaded(f"import {module}", ("mlx", "tqstore.codec", "tqstore.paged",
                                        "tqstore.metal")) == []


def test_the_daemon_and_its_command_load_no_live_cache() -> None:
    """The daemon never holds a live cache: `tqstore serve` loads neither the paged cache nor
    mlx-lm (the command line imports only the chosen subcommand's module)."""
    code = """
        from tqstore.cli import build_parser
        argv = ["serve", "--path", "unused"]
        build_parser(argv).parse_args(argv)
        import tqstore.daemon
        """
    assert _loaded(code, ("tqstore.paged", "mlx_lm")) == []


def test_codec_loads_nothing_above_it() -> None:
    assert _loaded("import tqstore.codec", NO_UPPER) == []


def test_kernel_cpu_path_loads_no_paged_cache() -> None:
    """Both references, run through the one dispatch point, on tiny pages."""
    code = """
        import tqstore
        import mlx.core as mx
        from tqstore.metal import dispatch

        dispatch.force_backend("reference")
        q = mx.ones((1, 2, 8))
        codes, scales = mx.zeros((2, 1, 4, 4), dtype=mx.uint8), mx.ones((2, 1, 4), mx.float16)
        book = mx.linspace(-1, 1, 16)
        out, lse = dispatch.paged_decode_attention(
            q, codes, scales, codes, scales, mx.array([[1]], mx.int32), mx.array([3], mx.int32),
            book, book, 4, 4, return_lse=True)
        tail = mx.ones((1, 1, 2, 8), mx.float16)
        res = dispatch.decode_epilogue(out, lse, q, tail, tail, None, None,
                                       mx.array([2, 2], mx.int32), mx.zeros((1, 8)),
                                       mx.eye(8)[None], 4, mx.float32)
        mx.eval(res)
        """
    assert _loaded(code, NO_PAGED) == []


def _imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("path", sorted(METAL.glob("*.py")), ids=lambda p: p.name)
def test_kernel_sources_import_no_paged_cache(path: Path) -> None:
    """Also imports inside functions, which no import-time check sees."""
    bad = sorted(n for n in _imported_names(path)
                 if n == "tqstore.paged" or n.startswith("tqstore.paged."))
    assert bad == [], f"{path.name} imports {bad}"
