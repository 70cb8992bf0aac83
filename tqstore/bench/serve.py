"""`tqstore bench serve`: the agent workload (tqstore.agents) against our endpoint and stock
`mlx_lm.server` (defaults, and `--kv-bits 4`) on the same model directory, same run.

For each agent count N, each server in turn is started fresh as real processes on free loopback
ports (ours: the daemon on a new store dir + `tqstore openai`; only one server runs at a time,
the machine has 2 cores), warmed up with one tiny unrelated request, and runs the workload: N
agents at once, K turns each. Measured: TTFT p50/p95 per turn and over turns 2..K, aggregate
tokens/s (completion tokens over the workload's wall time: what vLLM's benchmark_serving reports
as "output token throughput", and what a user waiting on N agents gets), the decode-window rate
(tqstore.agents.aggregate_decode_tokens_per_s: tokens over the time any request was decoding; a
server that lets arrivals wait while it decodes scores high on it), the server processes' peak
and final RSS (/proc VmHWM, VmRSS), KV bytes. Then the server is restarted (ours: daemon and
endpoint, the store dir kept; mlx_lm.server loses its RAM prompt cache) and turn 1 of every
agent is replayed at once; that TTFT is reported too. Ratios are against mlx_lm.server's
figures from the same run.

KV bytes. Ours: from GET /v1/stats, polled every 0.5 s while the workload runs: the sample
with the most tokens in live sequences' caches (`kv_tokens_live`) times the pool's bytes per
token (`kv_bytes_per_token`: its pages at the policy's bits), and that over
`kv_fp16_bytes_per_token`. mlx_lm.server exposes no figure, so it is computed from config.json
for the tokens the workload makes it hold at the end, every agent's final context (last prompt
+ its completion): tokens x 2 (K and V) x layers x kv_heads x head_dim x bytes per element,
with bytes per element = 2 for fp16; the activations' dtype (float32 for the bundled export)
for what it actually stores; and for `--kv-bits 4` (group 64) 4/8 + 2 x dtype bytes / 64
(mlx's QuantizedKVCache: packed codes, one scale and one bias per group). mlx_lm.server
quantizes only from `--quantized-kv-start` (5000 by default, beyond every prompt here), so the
kv4 baseline runs with `--quantized-kv-start 0` unless told otherwise.

Servers are sent no `seed`: mlx_lm.server batches only requests without one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tqstore.errors import InvalidArgument

SERVERS = ("tqstore", "mlx", "mlx-kv4", "tqstore-mixed")
# Ours: the daemon plus `tqstore openai`; tqstore-mixed runs it with --mixed-steps (prefill
# chunks carry the decode rows: the A/B of tqstore.paged.mixed in one run).
OURS = ("tqstore", "tqstore-mixed")
DEFAULT_SERVERS = SERVERS[:3]
BASELINE = "mlx"
# Defaults sized for the 2-core CPU VM, where they take ~20 minutes: a 1,500-token cold prefill
# through mlx_lm.server takes ~14 s there, the kv4 server runs requests one at a time, and our
# CPU decode at 2k tokens of context is ~2 tokens/s per sequence. The sizes (S=1500,
# T=500, R=200) with fewer agents, turns and new tokens; its full spec: --agents 1,4,8
# --turns 6 --max-tokens 64.
DEFAULTS = {"agents": "1,4", "turns": 3, "system_tokens": 1500, "task_tokens": 500,
            "tool_tokens": 200, "max_tokens": 16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", help="also write the JSON report (every per-turn record "
                                      "included) to this file")
    parser.add_argument("--model", help="mlx-lm model directory both servers load (default: the "
                                        "bundled SmolLM2 exported by `tqstore export-model`)")
    parser.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                        help="comma-separated subset of tqstore (daemon + `tqstore openai`), "
                             "mlx (stock mlx_lm.server), mlx-kv4 (mlx_lm.server --kv-bits 4), "
                             "tqstore-mixed (ours with --mixed-steps); "
                             f"ratios need {BASELINE} (default {','.join(DEFAULT_SERVERS)})")
    parser.add_argument("--agents", default=d["agents"],
                        help=f"comma-separated concurrent agent counts N (default {d['agents']}; "
                             "the issue's spec: 1,4,8)")
    parser.add_argument("--turns", type=int, default=d["turns"],
                        help=f"turns per agent (default {d['turns']}; the issue's spec: 6)")
    parser.add_argument("--system-tokens", type=int, default=d["system_tokens"],
                        help=f"shared system prompt, tokens (default {d['system_tokens']})")
    parser.add_argument("--task-tokens", type=int, default=d["task_tokens"],
                        help=f"each agent's own task, tokens (default {d['task_tokens']})")
    parser.add_argument("--tool-tokens", type=int, default=d["tool_tokens"],
                        help=f"each tool result, tokens (default {d['tool_tokens']})")
    parser.add_argument("--max-tokens", type=int, default=d["max_tokens"],
                        help=f"new tokens per turn (default {d['max_tokens']}; the issue's "
                             "spec: 64)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    parser.add_argument("--stagger", action="store_true",
                        help="start agents 2..N once agent 1's first turn has ended (the system "
                             "prompt is then cached), instead of all at once")
    parser.add_argument("--no-restart", action="store_true",
                        help="skip the restart and the replay of turn 1")
    parser.add_argument("--kv4-start", type=int, default=0,
                        help="--quantized-kv-start of the mlx-kv4 server (default 0: quantize "
                             "from the first token; mlx_lm.server's own default, 5000, leaves "
                             "every prompt here in full precision)")
    parser.add_argument("--pool-mib", type=int,
                        help="our endpoint's pool budget in MiB (default: its own default)")
    parser.add_argument("--decode-share", type=float,
                        help="our endpoint's --decode-share (default: its own default)")
    parser.add_argument("--startup-timeout", type=float, default=300.0,
                        help="seconds a server may take to answer /health (default 300)")
    parser.add_argument("--logs", help="directory for the servers' logs, kept (default: a temp "
                                       "dir, removed at the end)")


def _parse_agents(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgument(f"--agents must be comma-separated integers, not {text!r}")
    if not counts or min(counts) < 1:
        raise InvalidArgument(f"--agents must list counts >= 1, not {text!r}")
    return counts


def _parse_servers(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in SERVERS]
    if unknown or not names:
        raise InvalidArgument(f"--servers: unknown {unknown or text!r}; choose from "
                              f"{','.join(SERVERS)}")
    return names


# --- mlx_lm.server's KV bytes, from the model directory ---------------------------------------

_SAFETENSORS_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


def _activation_bytes(model_dir: Path) -> int:
    """Bytes per element of the weights (mlx-lm's activations, hence its KV, follow them):
    read from the first floating tensor in the safetensors header."""
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__" and info.get("dtype") in _SAFETENSORS_BYTES:
                return _SAFETENSORS_BYTES[info["dtype"]]
    raise InvalidArgument(f"{model_dir}: no floating-point tensor in its safetensors")


def kv_shape(model_dir: Path) -> dict[str, int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    return {"layers": cfg["num_hidden_layers"],
            "kv_heads": cfg.get("num_key_value_heads") or heads,
            "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
            "activation_bytes": _activation_bytes(model_dir)}


def mlx_kv_bytes_per_token(shape: dict[str, int], kv_bits: int | None,
                           group: int = 64) -> dict[str, float]:
    elements = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"]  # K and V
    act = shape["activation_bytes"]
    stored = act if kv_bits is None else kv_bits / 8 + 2 * act / group
    return {"fp16": elements * 2.0, "stored": elements * stored}


# --- one server's run --------------------------------------------------------------------------

class Stack:
    """One server under test as processes: ours is the daemon and the endpoint; mlx is one."""

    def __init__(self, name: str, model_dir: Path, logs: Path, args: argparse.Namespace,
                 store: Path) -> None:
        self.name, self.model_dir, self.logs, self.args = name, model_dir, logs, args
        self.store = store
        self.procs: list[Any] = []
        self.endpoint = None
        self.base_url = ""
        self.model = "default_model"
        self.starts = 0

    def start(self) -> float:
        from tqstore.servers import (ServerProcess, free_port, http_ok, mlx_server_argv,
                                     served_model, tcp_open, tqstore_argv)

        self.starts += 1
        log = lambda what: self.logs / f"{self.name}-{what}-{self.starts}.log"  # noqa: E731
        t0 = time.perf_counter()
        port = free_port()
        if self.name in OURS:
            dport = free_port()
            daemon = ServerProcess("tqstore serve", tqstore_argv(
                "serve", "--path", str(self.store), "--listen", f"127.0.0.1:{dport}",
                "--no-supervise"),  # memory() reads this very process
                log("daemon"))
            self.procs.append(daemon)
            daemon.wait_ready(lambda: tcp_open("127.0.0.1", dport), self.args.startup_timeout)
            extra = [] if self.args.pool_mib is None else ["--pool-mib", str(self.args.pool_mib)]
            if self.args.decode_share is not None:
                extra += ["--decode-share", str(self.args.decode_share)]
            if self.name == "tqstore-mixed":
                extra.append("--mixed-steps")
            argv = tqstore_argv("openai", "--model", str(self.model_dir), "--store",
                                f"127.0.0.1:{dport}", "--host", "127.0.0.1", "--port", str(port),
                                *extra)
        else:
            extra = [] if self.name == "mlx" else ["--kv-bits", "4", "--quantized-kv-start",
                                                   str(self.args.kv4_start)]
            argv = mlx_server_argv(str(self.model_dir), port, *extra)
        self.endpoint = ServerProcess(self.name, argv, log("server"))
        self.procs.append(self.endpoint)
        root = f"http://127.0.0.1:{port}"
        self.endpoint.wait_ready(lambda: http_ok(root + "/health"), self.args.startup_timeout)
        self.base_url = root + "/v1"
        if self.name in OURS:
            self.model = served_model(self.base_url)
        return time.perf_counter() - t0

    def memory(self) -> dict[str, dict[str, int]]:
        return {p.name: p.memory() for p in reversed(self.procs)}  # the endpoint first

    def stop(self) -> None:
        # The endpoint first (its background uploads finish within its SIGTERM grace), then the
        # daemon (it drains in-flight puts).
        for p in reversed(self.procs):
            p.stop(grace=60)
        self.procs = []


class StatsPoller:
    """GET /v1/stats every ``period`` s on a thread while the workload runs (our endpoint)."""

    def __init__(self, base_url: str, period: float = 0.5) -> None:
        self.url = base_url + "/stats"
        self.period = period
        self.samples: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stats-poller", daemon=True)

    def _loop(self) -> None:
        from tqstore.servers import http_json

        while not self._stop.is_set():
            t = time.perf_counter()
            try:
                self.samples.append((t, http_json(self.url)))
            except (OSError, ValueError):
                pass
            self._stop.wait(self.period)

    def __enter__(self) -> "StatsPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _ttft_summary(records: list) -> dict[str, Any]:
    from tqstore.agents import percentile

    turns = sorted({r.turn for r in records})
    per_turn = {t: [r.ttft_s for r in records if r.turn == t] for t in turns}
    later = [r.ttft_s for r in records if r.turn >= 2]
    return {"per_turn": {str(t): {"p50": percentile(v, 50), "p95": percentile(v, 95)}
                         for t, v in per_turn.items()},
            "turn1_p50": percentile(per_turn.get(1, []), 50),
            "later_p50": percentile(later, 50), "later_p95": percentile(later, 95)}


def _kv(stack: Stack, records: list, samples: list, shape: dict) -> dict:
    kv_bits = 4 if stack.name == "mlx-kv4" else None
    per_token = mlx_kv_bytes_per_token(shape, kv_bits)
    if stack.name not in OURS:
        last = {}
        for r in records:
            if r.turn >= last.get(r.agent, (0, 0))[0]:
                last[r.agent] = (r.turn, r.prompt_tokens + r.completion_tokens)
        tokens = sum(n for _, n in last.values())
        stored = per_token["stored"]
        if kv_bits and max((r.prompt_tokens for r in records), default=0) < stack.args.kv4_start:
            stored = per_token["fp16"] / 2 * shape["activation_bytes"]  # never quantized
        return {"tokens": tokens, "bytes": tokens * stored,
                "fp16_bytes": tokens * per_token["fp16"],
                "how": "computed: final contexts x bytes/token from config.json"}
    # The endpoint's figures: tokens in live sequences' caches and the pool's bytes per token
    # (its pages at the policy's bits); the peak sample is the one with the most tokens live.
    live = [(st.get("kv_tokens_live", 0), st) for _, st in samples]
    tokens, peak = max(live, key=lambda x: x[0], default=(0, {}))
    per = peak.get("kv_bytes_per_token")
    fp16 = peak.get("kv_fp16_bytes_per_token") or per_token["fp16"]
    return {"tokens": tokens, "bytes": tokens * per if per else None,
            "fp16_bytes": tokens * fp16, "vs_fp16": per / fp16 if per else None,
            "pool_bytes_used_peak": max((st.get("pool_bytes_used", 0) for _, st in samples),
                                        default=0),
            "how": "GET /v1/stats every 0.5 s: peak kv_tokens_live x kv_bytes_per_token"}


def run_server(name: str, n: int, workload, model_dir: Path, logs: Path,
               args: argparse.Namespace, shape: dict, say) -> dict[str, Any]:
    from tqstore.agents import aggregate_decode_tokens_per_s, percentile, run_agents
    from tqstore.servers import warm_up

    store = Path(tempfile.mkdtemp(prefix="tqstore-bench-serve-store-"))
    stack = Stack(name, model_dir, logs, args, store)
    try:
        startup = stack.start()
        warm = warm_up(stack.base_url, stack.model)
        say(f"  {name}: up in {startup:.1f} s, warm-up {warm:.1f} s; {n} agents x "
            f"{workload.config.turns} turns")
        with StatsPoller(stack.base_url) if name in OURS else _Null() as poller:
            run = run_agents(stack.base_url, workload, stack.model, agents=range(n),
                             stagger=args.stagger)
        records = sorted(run.records, key=lambda r: (r.agent, r.turn))
        samples = getattr(poller, "samples", [])
        out: dict[str, Any] = {
            "startup_s": startup, "wall_s": run.wall_s, "ttft": _ttft_summary(records),
            "decode_tokens_per_s": aggregate_decode_tokens_per_s(records),
            "completion_tokens": sum(r.completion_tokens for r in records),
            "throughput_tokens_per_s": sum(r.completion_tokens for r in records) / run.wall_s,
            "memory": stack.memory(),
            "kv": _kv(stack, records, samples, shape),
            "stats_final": samples[-1][1] if samples else None,
            "records": [r.as_dict() for r in records]}
        say(f"  {name}: {run.wall_s:.1f} s, TTFT turns>=2 p50 "
            f"{_fmt(out['ttft']['later_p50'])} s, {_fmt(out['throughput_tokens_per_s'])} tok/s "
            f"(decode window {_fmt(out['decode_tokens_per_s'])})")
        if not args.no_restart:
            stack.stop()
            stack.start()
            warm_up(stack.base_url, stack.model)
            replay = run_agents(stack.base_url, workload, stack.model, turns=1, agents=range(n),
                                stagger=args.stagger)
            rec = sorted(replay.records, key=lambda r: r.agent)
            ttfts = [r.ttft_s for r in rec]
            out["restart"] = {"ttft_p50": percentile(ttfts, 50), "ttft_p95": percentile(ttfts, 95),
                              "records": [r.as_dict() for r in rec]}
            say(f"  {name}: after restart, turn 1 TTFT p50 {_fmt(out['restart']['ttft_p50'])} s")
        return out
    finally:
        stack.stop()
        shutil.rmtree(store, ignore_errors=True)


class _Null:
    def __enter__(self) -> "_Null":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def ratios(results: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    base = results.get(BASELINE)
    if base is None:
        return {}
    out = {}
    for name, r in results.items():
        if name == BASELINE:
            continue
        out[name] = {
            "ttft_later_p50": _ratio(r["ttft"]["later_p50"], base["ttft"]["later_p50"]),
            "ttft_turn1_p50": _ratio(r["ttft"]["turn1_p50"], base["ttft"]["turn1_p50"]),
            "restart_ttft_p50": _ratio(r.get("restart", {}).get("ttft_p50"),
                                       base.get("restart", {}).get("ttft_p50")),
            "throughput_tokens_per_s": _ratio(r["throughput_tokens_per_s"],
                                              base["throughput_tokens_per_s"]),
            "decode_tokens_per_s": _ratio(r["decode_tokens_per_s"], base["decode_tokens_per_s"]),
            "kv_bytes_vs_fp16": r["kv"].get("vs_fp16", _ratio(r["kv"]["bytes"],
                                                               r["kv"].get("fp16_bytes"))),
            "peak_rss": _ratio(_rss(r), _rss(base))}
    return out


def _rss(result: dict) -> int:
    return sum(m.get("VmHWM", 0) for m in result["memory"].values())


def _print_table(n: int, results: dict[str, dict], rat: dict) -> None:
    print(f"\nN={n} agents (TTFT in s; RSS: peak MiB per process, ours endpoint+daemon)")
    print(f"{'server':<9} {'TTFT t1':>8} {'t>=2 p50':>9} {'t>=2 p95':>9} {'restart':>8} "
          f"{'dec-win/s':>9} {'agg/s':>6} {'peak RSS':>10} {'KV MiB':>7} {'KV/fp16':>7}")
    for name, r in results.items():
        kv = r["kv"]
        vs = kv.get("vs_fp16", _ratio(kv["bytes"], kv.get("fp16_bytes")))
        rss = "+".join(f"{m.get('VmHWM', 0) / 2**20:.0f}" for m in r["memory"].values())
        print(f"{name:<9} {_fmt(r['ttft']['turn1_p50']):>8} {_fmt(r['ttft']['later_p50']):>9} "
              f"{_fmt(r['ttft']['later_p95']):>9} {_fmt(r.get('restart', {}).get('ttft_p50')):>8} "
              f"{_fmt(r['decode_tokens_per_s'], 1):>9} {_fmt(r['throughput_tokens_per_s'], 1):>6} "
              f"{rss:>10} {_fmt(_ratio(kv['bytes'], 2**20), 1):>7} {_fmt(vs):>7}")
    turns = sorted({t for r in results.values() for t in r["ttft"]["per_turn"]}, key=int)
    for name, r in results.items():
        print(f"  {name} TTFT p50/p95 per turn: " + "  ".join(
            f"t{t} {_fmt(r['ttft']['per_turn'][t]['p50'])}/{_fmt(r['ttft']['per_turn'][t]['p95'])}"
            for t in turns if t in r["ttft"]["per_turn"]))
    for name, q in rat.items():
        print(f"  {name} / {BASELINE}: " + ", ".join(f"{k} {_fmt(v, 3)}" for k, v in q.items()))


def run(args: argparse.Namespace) -> int:
    from tqstore.agents import WorkloadConfig, build_workload, load_tokenizer

    counts = _parse_agents(args.agents)
    servers = _parse_servers(args.servers)
    if args.model:
        model_dir = Path(args.model).expanduser().resolve()
    else:
        from tqstore.models.export import bundled_model_dir
        model_dir = bundled_model_dir()
    config = WorkloadConfig(agents=max(counts), turns=args.turns, system_tokens=args.system_tokens,
                            task_tokens=args.task_tokens, tool_tokens=args.tool_tokens,
                            max_tokens=args.max_tokens, seed=args.seed)
    workload = build_workload(load_tokenizer(str(model_dir)), config)
    shape = kv_shape(model_dir)
    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="tqstore-bench-serve-"))
    logs.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    say(f"bench serve: {model_dir}; workload {workload.token_counts['system']} system + "
        f"~{config.task_tokens} task + ~{config.tool_tokens}/tool tokens, {config.turns} turns, "
        f"{config.max_tokens} new tokens; logs in {logs}")
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {platform.node()}", "model_dir": str(model_dir),
        "command": "tqstore bench serve " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else
        "tqstore bench serve", "config": config.__dict__, "kv_shape": shape,
        "token_counts": workload.token_counts, "load_average_start": list(os.getloadavg()),
        "runs": []}
    try:
        for n in counts:
            results = {}
            say(f"N={n}")
            failed = {}
            for name in servers:
                try:
                    results[name] = run_server(name, n, workload, model_dir, logs, args, shape,
                                               say)
                except (RuntimeError, OSError) as exc:
                    # One server failing (a crash, a broken stream) must not lose the others'
                    # figures: recorded with its log's tail, and the run goes on.
                    failed[name] = {"error": f"{type(exc).__name__}: {exc}",
                                    "log_tail": _log_tail(logs, name)}
                    say(f"  {name}: FAILED: {exc}")
            rat = ratios(results)
            report["runs"].append({"agents": n, "servers": results, "failed": failed,
                                   "ratios": rat})
            if not args.json:
                _print_table(n, results, rat)
                for name, f in failed.items():
                    print(f"{name}: FAILED: {f['error']}")
    finally:
        report["load_average_end"] = list(os.getloadavg())
        if not args.logs:
            shutil.rmtree(logs, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        start, end = report["load_average_start"], report["load_average_end"]
        print(f"\nload average (1/5/15 min) at start {start[0]:.1f}/{start[1]:.1f}/{start[2]:.1f}, "
              f"at end {end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f}")
    return 1 if any(r["failed"] for r in report["runs"]) else 0


def _log_tail(logs: Path, name: str, lines: int = 30) -> str:
    newest = sorted(logs.glob(f"{name}-server-*.log"), key=lambda p: p.stat().st_mtime)
    if not newest:
        return ""
    return "\n".join(newest[-1].read_text(errors="replace").splitlines()[-lines:])
