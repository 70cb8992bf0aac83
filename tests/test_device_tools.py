"""The device benchmark tools run wherever the suite runs: tools/attention_e2e.py end to end on a
tiny model (prefill and synthetic-context modes), tools/batch_decode_gpu.py on a tiny batch
(timed, and counting ops and CUDA graphs), tools/graph_limits_gpu.sh's own logic,
tools/step_host_cost.py (kernels stubbed: any machine);
tools/launch_overhead.py and tools/mma_phases.py measure on a GPU (CUDA for mma_phases) and
refuse clearly without one. Their numbers come from the GPU machine (docs/BENCHMARKS.md)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from tqstore.metal.attention_kernel import gpu_build

ROOT = Path(__file__).resolve().parents[1]


def tool_json(tmp_path: Path, tool: str, *args: str, timeout: int = 600):
    """Run tools/<tool> with `args` and `--json <file>`; it must exit 0: its JSON report."""
    out = tmp_path / "report.json"
    res = subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args, "--json", str(out)],
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", [[], ["--synthetic"]], ids=["prefill", "synthetic"])
def test_attention_e2e_runs_every_row_on_a_tiny_model(mode, tmp_path):
    result = tool_json(tmp_path, "attention_e2e.py", "--small", "--context", "40", "--steps", "2",
                       "--warmup", "2", "--layers", "2", "--skip-reference", *mode)
    assert result["synthetic"] == bool(mode) and result["context"] == 40
    assert set(result["tokens_per_s"]) == {"fp16", "tq-kernels", "tq-kernels-tail"}
    assert all(v > 0 for v in result["tokens_per_s"].values())
    assert set(result["tokens_per_s_pipelined"]) == set(result["tokens_per_s"])
    assert all(v > 0 for v in result["tokens_per_s_pipelined"].values())


def test_batch_decode_gpu_runs_every_row_on_a_tiny_batch(tmp_path):
    rows = tool_json(tmp_path, "batch_decode_gpu.py", "--shape", "tiny", "--batches", "2",
                     "--contexts", "40", "--steps", "2", "--warmup", "2",
                     "--pool-mib", "16")["rows"]
    assert [r["name"] for r in rows] == ["fp16", "tq-rows", "tq-pages", "tq-3launch",
                                         "tq-2launch", "tq-batched"]
    assert all(r["batch"] == 2 and r["context"] == 40 for r in rows)
    assert all(r["sync_tok_s"] > 0 and r["pipelined_tok_s"] > 0 for r in rows)
    # Ours holds fewer bytes per sequence than the fp16 cache (codes plus a partial fp16 tail).
    assert rows[0]["sequences_fit_x"] == 1.0
    assert len({r["kv_bytes_per_seq"] for r in rows[1:]}) == 1
    assert rows[1]["kv_bytes_per_seq"] < rows[0]["kv_bytes_per_seq"]
    # Each pipelined step's ms and the memory it allocated: one entry per timed step.
    for r in rows:
        assert len(r["pipelined_step_ms"]) == len(r["pipelined_step_peak_mib"]) == 2
        for i, ms in enumerate(r["pipelined_step_ms"]):  # build and encode are parts of it
            parts = r["pipelined_step_build_ms"][i] + r["pipelined_step_encode_ms"][i]
            assert 0 < r["pipelined_step_build_ms"][i] and 0 <= parts <= ms
        assert r["pipelined_step_ms_median"] <= r["pipelined_step_ms_max"]
        assert r["pipelined_step_ms_max"] == max(r["pipelined_step_ms"])


def test_batch_decode_gpu_counts_ops_and_cuda_graphs_per_step(tmp_path):
    dots = tmp_path / "dots"
    report = tool_json(tmp_path, "batch_decode_gpu.py", "--shape", "tiny", "--batches", "2",
                       "--contexts", "40", "--steps", "2", "--warmup", "1", "--pool-mib", "16",
                       "--skip", "rows", "pages", "3launch", "2launch", "--graphs", str(dots))
    rows = report["rows"]
    assert [r["name"] for r in rows] == ["fp16", "tq-batched"]
    assert all("sync_tok_s" not in r for r in rows)  # nothing is timed in this mode
    for r in rows:
        # Every primitive of one step's graph, by name; the step ends in the tokens' argmax.
        assert r["ops_per_step"] == sum(r["ops"].values()) > 0
        assert r["ops"]["ArgReduce"] == 1
        # MLX writes a dot file per committed CUDA graph; other backends commit none.
        if mx.cuda.is_available():
            assert r["graphs_per_sync_step"] >= 1 and r["graphs_per_pipelined_step"] >= 1
        else:
            assert r["graphs_per_sync_step"] == r["graphs_per_pipelined_step"] == 0
    assert (dots / "graph-ops.dot").exists() and not list(dots.glob("graph_*.dot"))


def test_graph_limits_driver_stops_at_its_time_limit_and_refuses_bad_arguments(tmp_path):
    script = str(ROOT / "tools/graph_limits_gpu.sh")
    res = subprocess.run(["bash", script, "time", str(tmp_path), "2", "--shape", "tiny"],
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "TQSTORE_GRAPH_LIMIT_S": "-1"})
    assert res.returncode == 0 and "stopped before round 0 setting default" in res.stdout
    for args, env, says in ((["nope", str(tmp_path)], {}, "usage"), (["time"], {}, "usage"),
                            (["count", str(tmp_path)], {"TQSTORE_GRAPH_SETTINGS": "mb bogus"},
                             "unknown setting bogus")):
        res = subprocess.run(["bash", script, *args], capture_output=True, text=True,
                             timeout=60, env={"PATH": "/usr/bin:/bin", **env})
        assert res.returncode == 2 and says in res.stderr, res.stderr
        assert "graphs per step" not in res.stdout  # refused before running anything


def test_batch_decode_gpu_rounds_rotate_our_rows_and_report_medians(tmp_path):
    report = tool_json(tmp_path, "batch_decode_gpu.py", "--shape", "tiny", "--batches", "2",
                       "--contexts", "40", "--steps", "2", "--warmup", "1", "--pool-mib", "16",
                       "--rounds", "2", "--skip", "rows", "pages", "3launch")
    names = [(r["round"], r["name"]) for r in report["rows"]]
    # fp16 (the baseline) first in every round; our rows in an order rotated by one.
    assert names == [(0, "fp16"), (0, "tq-2launch"), (0, "tq-batched"),
                     (1, "fp16"), (1, "tq-batched"), (1, "tq-2launch")]
    medians = {m["name"]: m for m in report["medians"]}
    assert set(medians) == {"fp16", "tq-2launch", "tq-batched"}
    mine = [r["pipelined_vs_fp16"] for r in report["rows"] if r["name"] == "tq-batched"]
    assert medians["tq-batched"]["pipelined_vs_fp16"] == pytest.approx(sum(mine) / 2)
    assert medians["fp16"]["sync_vs_fp16"] == 1.0 and medians["fp16"]["rounds"] == 2


def test_launch_overhead_measures_on_a_gpu_and_refuses_without_one():
    res = subprocess.run([sys.executable, str(ROOT / "tools/launch_overhead.py")],
                         capture_output=True, text=True, timeout=300)
    if mx.cuda.is_available() or mx.metal.is_available():
        assert res.returncode == 0, res.stderr[-3000:]
        assert "tqstore decode epilogue" in res.stdout
    else:
        assert res.returncode == 2 and "no GPU backend" in res.stderr


@pytest.mark.parametrize("form", ["split", "step", "step-epilogue"])
def test_mma_phases_instruments_the_current_kernel(tmp_path, form):
    """tools/mma_phases.py stamps the kernel at source anchors: every anchor must still exist
    once in the current kernel body of each form, and the instrumented source must still
    compile."""
    sys.path.insert(0, str(ROOT / "tools"))
    from kernel_sass import NVCC_PRELUDE, kernel_source
    from mma_phases import STAMPS, form_geometry, instrumented_source, phases
    from tests.metal.signature import syntax_check

    geo = form_geometry(form)
    src = instrumented_source(geo)
    assert src.count("clock64()") == len(phases(geo)) + 2 <= STAMPS
    assert geo.step == (form != "split") and (geo.epilogue is not None) == (form == "step-epilogue")
    dbg = (("dbg", "uint32"),)
    syntax_check(kernel_source(geo, src, prelude=None, extra_outputs=dbg), tmp_path,
                 "mma_phases")
    if shutil.which("nvcc"):  # the stamps themselves are device code: the real compiler
        dev = kernel_source(geo, src, prelude=NVCC_PRELUDE, extra_outputs=dbg)
        (tmp_path / "phases.cu").write_text(dev)
        res = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", str(tmp_path / "p.cubin"),
                              str(tmp_path / "phases.cu")], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]


def test_mma_phases_measures_on_cuda_and_refuses_elsewhere():
    res = subprocess.run([sys.executable, str(ROOT / "tools/mma_phases.py")],
                         capture_output=True, text=True, timeout=300)
    if mx.cuda.is_available():
        assert res.returncode == 0, res.stderr[-3000:]
        assert "merging threadgroups" in res.stdout
    else:
        assert res.returncode == 2 and "CUDA" in res.stderr


def test_upload_stall_bench_runs_every_mode_on_a_tiny_model(tmp_path):
    """tools/upload_stall_bench.py end to end (a real daemon, a tiny random model): every mode
    ran, uploaded its blocks where it has a daemon, and by the route it names (views here,
    the copy engine on CUDA, in pieces for piecesX; copied when forced)."""
    runs = tool_json(tmp_path, "upload_stall_bench.py", "--shape", "tiny", "--sizes", "300",
                     "--block", "64", "--repeats", "1", "--max-tokens", "3",
                     "--piece-mb", "0.01")["rows"][0]["runs"]
    assert set(runs) == {"none", "landing", "copied", "pieces0.01"}
    landed = "copy-engine" if mx.cuda.is_available() else "views"
    for mode, [run] in runs.items():
        assert run["route"] == {"none": None, "copied": "copied"}.get(mode, landed), mode
        assert (run["uploaded_blocks"] > 0) == (mode != "none"), mode
        assert run["first_step_s"] > 0 and run["ttft_s"] > 0


def test_landing_stall_probe_times_every_work_alone_and_beside_a_landing(tmp_path):
    """tools/landing_stall_probe.py end to end at a tiny size: every work timed both ways, by
    the route the backend takes."""
    reports = tool_json(tmp_path, "landing_stall_probe.py", "--tokens", "64", "--side", "64",
                        "--repeats", "1", "--piece-mb", "0", "0.01", timeout=300)
    assert [r["piece_mb"] for r in reports] == [0, 0.01]
    for report in reports:
        assert report["route"] == ("copy-engine" if mx.cuda.is_available() else "views")
        for work in ("tiny", "chain50", "chain400", "chain2000", "big", "host_made200"):
            assert report[work]["alone_s"] > 0 and report[work]["beside_landing_s"] > 0
            assert report[work]["landing_s"] > 0


def test_read_path_bench_times_both_loops_and_the_raw_reads(tmp_path):
    result = tool_json(tmp_path, "read_path_bench.py", "--blocks", "2", "--block", "16",
                       "--rounds", "1", "--best", "1")
    assert result["bytes"] == 2 * 4 * 30 * 3 * 16 * 64
    assert set(result["gbps"]) == {"C", "python", "C reused", "restore staged",
                                   "restore numpy", "raw fresh", "raw reused", "raw parallel"}
    assert all(len(v) == 1 and v[0] > 0 for v in result["gbps"].values())


def test_cpu_hit_phases_times_every_mode_and_checks_the_hits_tokens(tmp_path):
    result = tool_json(tmp_path, "cpu_hit_phases.py", "--tokens", "300", "--rounds", "1",
                       "--new-tokens", "2", "--deferred", "--numpy-restore")
    assert result["tokens"] == 300 and result["hit_tokens"] == 299
    assert set(result["rounds"]) == {"every", "one", "deferred", "numpy"}
    # On unified memory the fetch reads into MLX's own arrays, except where the tool turns it
    # off; on CUDA into the pinned staging buffer (then one copy kernel), in every mode.
    in_place = [0, 0, 0, 0] if gpu_build("cuda") else [2, 2, 2, 0]
    assert [h[0]["in_place"] for h in result["rounds"].values()] == in_place
    for hits in result["rounds"].values():
        assert len(hits) == 1 and hits[0]["ttft_s"] > 0 and hits[0]["c_s"] <= hits[0]["quantize_s"]


def test_step_host_cost_times_graph_building_with_the_kernels_stubbed(tmp_path):
    report = tool_json(tmp_path, "step_host_cost.py", "--batches", "1", "2", "--layers", "2",
                       "--steps", "2", "--context", "40")
    assert [r["batch"] for r in report["rows"]] == [1, 2] and report["layers"] == 2
    assert all(r["build_ms"] > 0 and r["fp16_build_ms"] > 0 for r in report["rows"])
    for r in report["rows"]:  # each step's build, whose mean is build_ms
        assert len(r["build_ms_per_step"]) == 2
        assert abs(sum(r["build_ms_per_step"]) / 2 - r["build_ms"]) < 1e-6 * r["build_ms"] + 1e-9


def test_step_host_cost_sections_account_each_attention_layers_building(tmp_path):
    report = tool_json(tmp_path, "step_host_cost.py", "--batches", "1", "--layers", "2",
                       "--steps", "3", "--context", "40", "--sections")
    sections = report["sections_ms_per_step"]
    assert set(sections) == {"fp16 B=1", "ours B=1"}
    for label, ms in sections.items():
        # Every section timed, none negative, and the sections are parts of the step's build.
        assert set(ms) == {"projections", "head reshapes", "rope", "update_and_fetch",
                           "attention", "release q/k/v", "output"}, label
        assert all(v >= 0 for v in ms.values()) and ms["attention"] > 0
    ours = report["rows"][0]
    assert sum(sections["ours B=1"].values()) <= ours["build_ms"]


def test_interleaved_decode_alternates_fp16_and_ours_in_one_process(tmp_path):
    report = tool_json(tmp_path, "interleaved_decode.py", "--shape", "tiny", "--batch", "2",
                       "--context", "40", "--pairs", "3", "--chunk", "4", "--warmup", "2",
                       "--pool-mib", "16")
    assert report["batch"] == 2 and report["pairs"] == 3 and report["chunk"] == 4
    assert len(report["pair_ratios"]) == 3 and all(r > 0 for r in report["pair_ratios"])
    assert report["median_ratio"] == sorted(report["pair_ratios"])[1]
    for name in ("fp16", "tq-batched"):
        assert len(report[name]["chunk_seconds"]) == 3 and report[name]["tok_s"] > 0
    # The whole run's ratio is over every timed step of each side.
    whole = sum(report["fp16"]["chunk_seconds"]) / sum(report["tq-batched"]["chunk_seconds"])
    assert abs(report["whole_run_ratio"] - whole) < 1e-9
    # The steady steps: each chunk's intervals between completions, its first and last
    # steps left out (4 steps: 2 intervals per chunk), and their medians' ratio.
    for name in ("fp16", "tq-batched"):
        assert report[name]["steady_steps"] == 3 * 2 and report[name]["median_step_ms"] > 0
    assert abs(report["median_step_ratio"] - report["fp16"]["median_step_ms"]
               / report["tq-batched"]["median_step_ms"]) < 1e-12
    # Ours held its sequences in pages (fewer bytes than fp16): our caches ran, not fp16's twice.
    assert report["kv_bytes_per_seq"]["tq-batched"] < report["kv_bytes_per_seq"]["fp16"]


def test_kernel_sass_counts_the_round_trips_of_a_stretch_of_loads():
    """tools/kernel_sass.py's reading of SASS: loads issued together cost one round trip;
    a load whose register the next address needs (the serialized tail loads it found in
    the folded epilogue) costs one each; barriers split the stretches."""
    sys.path.insert(0, str(ROOT / "tools"))
    from kernel_sass import instructions, load_regions
    sass = """
        /*0000*/                   LDG.E R4, desc[UR4][R2.64] ;   /* 0x0 */
        /*0010*/                   LDG.E R5, desc[UR4][R2.64+0x4] ;   /* 0x0 */
        /*0020*/                   @!P0 LDG.E.U16 R6, desc[UR4][R8.64] ;   /* 0x0 */
        /*0030*/                   FADD R7, R4, R5 ;   /* 0x0 */
        /*0040*/                   STS [R9], R7 ;   /* 0x0 */
        /*0048*/                   MEMBAR.SC.GPU ;   /* 0x0 */
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;   /* 0x0 */
        /*0060*/                   @P0 LDG.E.U16 R20, desc[UR4][R20.64] ;   /* 0x0 */
        /*0070*/                   IADD3 R20, R20, 0x2, RZ ;   /* 0x0 */
        /*0080*/                   @P1 LDG.E.U16 R20, desc[UR4][R20.64] ;   /* 0x0 */
        /*0090*/                   IADD3 R20, R20, 0x2, RZ ;   /* 0x0 */
        /*00a0*/                   LDG.E.64 R22, desc[UR4][R10.64] ;   /* 0x0 */
        /*00b0*/                   FADD R11, R23, R23 ;   /* 0x0 */
        /*00c0*/                   LDG.E.128 R12, desc[UR4][R10.64] ;   /* 0x0 */
        /*00d0*/                   FADD R11, R15, R15 ;   /* 0x0 */
        /*00e0*/                   EXIT ;   /* 0x0 */
    """
    program = instructions(sass)
    assert program[0] == ("0000", "LDG.E R4, desc[UR4][R2.64]") and len(program) == 16
    first, second = load_regions(program)  # MEMBAR (a fence) does not split a stretch
    assert (first["loads"], first["round_trips"]) == (3, 1)
    # R23: the .64 load's pair; R15: the .128 load's last register
    assert (second["loads"], second["round_trips"]) == (4, 4)


def test_kernel_sass_needs_nvcc_or_reads_ptxas():
    res = subprocess.run([sys.executable, str(ROOT / "tools/kernel_sass.py"), "--form", "split"],
                         capture_output=True, text=True, timeout=600)
    if shutil.which("nvcc"):
        assert res.returncode == 0, res.stderr[-3000:]
        assert "registers" in res.stdout and "-maxrregcount=128" in res.stdout
    else:
        assert res.returncode == 2 and "needs nvcc" in res.stderr


@pytest.mark.parametrize("form", ["split", "step-epilogue"])
def test_mma_phases_summarizes_the_merging_threadgroups_apart(form):
    """tools/mma_phases.py's summary on written stamps: two threadgroups, one of them merging.
    Every phase but the merging ones is the median over both; the merge (and the epilogue's
    parts) only over the merging one; the span is first start to last end."""
    sys.path.insert(0, str(ROOT / "tools"))
    import numpy as np
    from mma_phases import STAMPS, form_geometry, phase_names, phases, summarize

    geo = form_geometry(form)
    n = len(phases(geo)) + 2  # stamps written: start, one per phase, the end
    merging_from = n - 1 - (4 if geo.epilogue else 0)  # the first merging-only stamp
    ghz = 2.0
    dbg = np.zeros((2, 2 * STAMPS), dtype=np.int64)
    for tg, step in ((0, 2000), (1, 4000)):  # clock cycles per phase: 1 us and 2 us
        for k in range(n):
            dbg[tg, STAMPS + k] = k * step
            dbg[tg, k] = 1000 * k * (1 + tg)  # globaltimer ns
    # threadgroup 0 does not merge: its merging-only stamps stay zero (the epilogue's) or,
    # without the epilogue, its last phase takes no time
    if geo.epilogue:
        dbg[0, STAMPS + merging_from:STAMPS + n - 1] = 0
        dbg[0, STAMPS + n - 1] = dbg[0, STAMPS + merging_from - 1]
    else:
        dbg[0, STAMPS + n - 1] = dbg[0, STAMPS + n - 2]
    spans, rows = summarize(geo, [dbg], ghz)
    assert [r[0] for r in rows] == phase_names(geo)
    assert spans == [(dbg[1, n - 1] - dbg[0, 0]) / 1e3]
    for k, (name, median, _) in enumerate(rows, start=1):
        want = 2.0 if k >= merging_from else 1.5  # the merging threadgroup alone, or both
        assert median == pytest.approx(want), (name, median)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git (the script packs branches)")
def test_ab_trees_packs_branches_and_runs_every_tree_each_round(tmp_path):
    """tools/ab_trees.sh in a repository of its own (a copy of the script, a stub
    mma_phases.py that prints which tree it belongs to): `pack` copies a branch's tqstore and
    tools with its revision; `run` times the working tree and every packed tree, each with its
    own tools, every round, starting one tree later each round; bad input is refused."""
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    (repo / "tqstore").mkdir()
    shutil.copy(ROOT / "tools" / "ab_trees.sh", repo / "tools")
    stub = repo / "tools" / "mma_phases.py"
    stub.write_text("import sys\nprint('launch span of tree worktree', ' '.join(sys.argv[1:]))\n")
    (repo / "tqstore" / "__init__.py").write_text("")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    _git(repo, "checkout", "-qb", "feature/b1")
    stub.write_text(stub.read_text().replace("tree worktree", "tree b1"))
    _git(repo, "commit", "-qam", "b1")
    _git(repo, "checkout", "-q", "main")
    env = {**os.environ, "TQSTORE_AB_DIR": str(tmp_path / "ab"), "OUT": str(tmp_path)}
    script = ["bash", str(repo / "tools" / "ab_trees.sh")]

    def call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(script + list(args), env=env, capture_output=True, text=True,
                              timeout=120)

    packed = call("pack", "feature/b1")
    assert packed.returncode == 0, packed.stderr
    tree = tmp_path / "ab" / "feature_b1"
    assert (tree / "REV").read_text().strip() == _git(repo, "rev-parse", "--short", "feature/b1")
    assert (tree / "tqstore" / "__init__.py").is_file()
    ran = call("run", "2", "--contexts", "4096")
    assert ran.returncode == 0, ran.stderr
    order = [line.split()[2:4] for line in ran.stdout.splitlines() if line.startswith("== ")]
    assert order == [["1", "worktree"], ["1", "feature_b1"],
                     ["2", "feature_b1"], ["2", "worktree"]], ran.stdout
    for name, marker in (("worktree", "tree worktree"), ("feature_b1", "tree b1")):
        for round_ in (1, 2):  # each tree ran its own tools, with the arguments given
            text = (tmp_path / f"phases_{name}_{round_}.txt").read_text()
            assert marker in text and "--contexts 4096" in text, text
    # Bad input: a round count that is no count, the working tree's name as a branch, and a
    # folder that holds anything but packed trees (never removed).
    assert call("run", "0").returncode == 2
    assert call("pack", "worktree").returncode == 2
    (tmp_path / "ab" / "notes.txt").write_text("keep me")
    refused = call("pack", "feature/b1")
    assert refused.returncode == 2 and "not removing" in refused.stderr
    assert (tmp_path / "ab" / "notes.txt").read_text() == "keep me"
    assert call().returncode == 2

