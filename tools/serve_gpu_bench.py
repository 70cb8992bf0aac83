"""Aggregate decode throughput of `tqstore openai` against stock `mlx_lm.server` on one GPU.

Issue 14's GPU benchmark: the same random-weight Llama-3-8B-shaped mlx-lm model directory, the
same run, both servers as real processes started fresh for every configuration, N concurrent
requests (8 and 32 by default) of ~8k prompt tokens each (distinct random-token prompts: no
prefix is shared between requests, configurations or servers), 64 new tokens each at
temperature 0, the tokenizer's end-of-sequence ids pushed down with ``logit_bias`` so every
request runs its full length (completion tokens are still counted from ``usage``).

The model directory (written once, reused while its marker matches):
  config.json  llama: hidden 4096, 32 layers, 32 heads, 8 KV heads, head_dim 128, intermediate
               14336, rope_theta 500000, max_position_embeddings 131072, untied lm_head; vocab
               49152 = SmolLM2's tokenizer (every id it emits is a valid row; the embedding and
               lm_head are 49152 x 4096 instead of Llama-3's 128256 x 4096). No llama3
               rope_scaling (irrelevant for random weights).
  weights      bf16, normal(0, 0.02), RMSNorm weights 1, in shards of 8 layers plus
               model.safetensors.index.json, written with mx.save_safetensors.
  tokenizer    SmolLM2's tokenizer and chat template (tqstore.models.export's bundled export).

Per configuration and server: start the server, wait for /v1/models, warm it up (N concurrent
requests of ~2.3k tokens, 8 new tokens: the model loads and MLX compiles the batched prefill
and decode kernels of this N before anything is timed; a warm-up of 2 requests left ~3-6 s of
first-use cost inside mlx_lm.server's timed batch of 8), release N threads at once (the official openai
client, streamed with include_usage), poll GPU memory (nvidia-smi) and our /v1/stats meanwhile,
stop the server, next. Figures per configuration:
  wall_s             first request sent -> last response ended
  agg_tok_s          sum of completion tokens / wall_s
  decode_sum_tok_s   sum over requests of (completion tokens - 1) / (last token - first token)
  decode_union_tok_s tokens after each request's first / time at least one request was decoding
  ttft p50/p95       request sent -> first content chunk
  gpu_peak_mib       peak of nvidia-smi's memory.used while the server was up, minus the GPU's
                     before it started; also the server's own peak (compute-apps by pid) where
                     the pid is visible
Prints a table and writes $OUT/serve_gpu_bench.json (plus server logs) when $OUT is set.

  python3 tools/serve_gpu_bench.py                       # the issue's run (a GPU machine)
  python3 tools/serve_gpu_bench.py --shape tiny --n 2 --prompt-tokens 300 --new-tokens 8 \
      --pool-mib 64 --warm-n 1 --warm-tokens 64         # a CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_bench_inputs import (SHAPES, ascii_ids, chat_len, make_prompt,  # noqa: E402
                              messages, write_model)  # (tools/ is the script's path)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- GPU memory ----------------------------------------------------------------------------

def smi(query: str, what: str = "--query-gpu") -> list[list[str]]:
    try:
        out = subprocess.run(["nvidia-smi", f"{what}={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line]


def gpu_used_mib() -> int | None:
    rows = smi("memory.used")
    try:
        return sum(int(r[0]) for r in rows) if rows else None
    except ValueError:
        return None


class Poller:
    """Polls GPU memory (whole GPU, and the server's pid among compute apps) and, for our
    endpoint, /v1/stats, every ``period`` seconds until stopped."""

    def __init__(self, pid: int, stats_url: str | None, period: float = 0.5) -> None:
        self.pid, self.stats_url, self.period = pid, stats_url, period
        self.gpu_peak = None
        self.app_peak = None
        self.apps_seen: set[str] = set()
        self.stats_peak: dict = {}
        self.last_stats = None
        self._stop = threading.Event()
        self.stats_samples = 0
        self._threads = [threading.Thread(target=self._gpu, daemon=True)]
        if stats_url:  # its own thread: nvidia-smi calls must not thin out the samples
            self._threads.append(threading.Thread(target=self._stats, daemon=True))
        for t in self._threads:
            t.start()

    def _gpu(self) -> None:
        while not self._stop.is_set():
            used = gpu_used_mib()
            if used is not None:
                self.gpu_peak = used if self.gpu_peak is None else max(self.gpu_peak, used)
            for row in smi("pid,used_memory", "--query-compute-apps"):
                if len(row) >= 2:
                    self.apps_seen.add(row[0])
                    if row[0] == str(self.pid):
                        try:
                            v = int(row[1])
                        except ValueError:
                            continue
                        self.app_peak = v if self.app_peak is None else max(self.app_peak, v)
            self._stop.wait(self.period)

    def _stats(self) -> None:
        from tqstore.servers import http_json

        while not self._stop.is_set():
            try:
                s = http_json(self.stats_url, timeout=5.0)
                self.last_stats = s
                self.stats_samples += 1
                for k in ("kv_tokens_live", "pool_bytes_used", "active_sequences",
                          "decoding", "decode_tokens_per_s"):
                    if isinstance(s.get(k), (int, float)):
                        self.stats_peak[k] = max(self.stats_peak.get(k, 0), s[k])
            except Exception:  # noqa: BLE001 - a busy server may answer late
                pass
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)


# --- requests ------------------------------------------------------------------------------

@dataclass
class Rec:
    idx: int
    prompt_tokens: int
    completion_tokens: int
    start: float
    first: float
    last: float
    end: float
    server_ttft_s: float | None = None
    times: tuple = ()  # arrival of every content chunk (about one per token)

    @property
    def ttft(self) -> float:
        return self.first - self.start


def one_request(base_url: str, model: str, text: str, max_tokens: int, bias: dict,
                timeout: float, idx: int) -> Rec:
    from tqstore.agents import make_client

    client = make_client(base_url, timeout_s=timeout)
    try:
        start = time.perf_counter()
        stream = client.chat.completions.create(
            model=model, messages=messages(text), max_tokens=max_tokens,
            temperature=0.0, stream=True, stream_options={"include_usage": True},
            logit_bias=bias)
        first = last = None
        usage = None
        times = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                now = time.perf_counter()
                first = now if first is None else first
                last = now
                times.append(now)
            if getattr(chunk, "usage", None) is not None:
                usage = chunk.usage.model_dump()
        end = time.perf_counter()
    finally:
        client.close()
    if usage is None:
        raise RuntimeError(f"request {idx}: no usage chunk")
    first = end if first is None else first
    last = end if last is None else last
    tq = usage.get("tqstore") or {}
    return Rec(idx, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
               start, first, last, end, tq.get("ttft_s"), tuple(times))


def fire(base_url: str, model: str, texts: list[str], max_tokens: int, bias: dict,
         timeout: float) -> tuple[list[Rec], list[str]]:
    recs: list[Rec] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(texts))

    def work(i: int) -> None:
        barrier.wait()
        try:
            r = one_request(base_url, model, texts[i], max_tokens, bias, timeout, i)
            with lock:
                recs.append(r)
        except Exception as exc:  # noqa: BLE001 - reported with the figures
            with lock:
                errors.append(f"request {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    return recs, errors


def pct(values: list[float], q: float) -> float | None:
    from tqstore.agents import percentile

    return percentile(values, q)


def summarize(recs: list[Rec]) -> dict:
    if not recs:
        return {}
    t0 = min(r.start for r in recs)
    wall = max(r.end for r in recs) - t0
    comp = sum(r.completion_tokens for r in recs)
    per = [(r.completion_tokens - 1) / (r.last - r.first) for r in recs
           if r.completion_tokens > 1 and r.last > r.first]
    from tqstore.agents import covered_seconds

    busy = covered_seconds((r.first, r.end) for r in recs if r.completion_tokens > 1)
    after_first = sum(r.completion_tokens - 1 for r in recs if r.completion_tokens > 1)
    ttfts = [r.ttft for r in recs]
    # Pure decode: content chunks that arrived after the last request's first token (no prefill
    # left anywhere), over that window: all unfinished sequences decode together.
    all_first = max(r.first for r in recs)
    tail_end = max(r.end for r in recs)
    tail = sum(1 for r in recs for t in r.times if t > all_first)
    return {
        "requests": len(recs), "wall_s": round(wall, 3),
        "prompt_tokens_mean": round(statistics.mean(r.prompt_tokens for r in recs), 1),
        "completion_tokens": comp,
        "completion_tokens_min": min(r.completion_tokens for r in recs),
        "agg_tok_s": round(comp / wall, 2) if wall > 0 else None,
        "decode_sum_tok_s": round(sum(per), 2) if per else None,
        "decode_union_tok_s": round(after_first / busy, 2) if busy > 0 else None,
        "ttft_p50_s": round(pct(ttfts, 50), 3), "ttft_p95_s": round(pct(ttfts, 95), 3),
        "ttft_max_s": round(max(ttfts), 3),
        "steady_decode_tok_s": round(tail / (tail_end - all_first), 2)
        if tail_end > all_first else None,
        "steady_decode_chunks": tail, "steady_window_s": round(tail_end - all_first, 3),
        "first_token_spread_s": round(max(r.first for r in recs) - min(r.first for r in recs), 3),
        "prefill_tok_s": round(sum(r.prompt_tokens for r in recs)
                               / (max(r.first for r in recs) - t0), 1),
    }


# --- one configuration ---------------------------------------------------------------------

def server_argv(kind: str, model_dir: str, port: int, args) -> list[str]:
    if kind == "tqstore":
        return [sys.executable, "-m", "tqstore.cli", "openai", "--model", model_dir,
                "--store", "none", "--port", str(port), "--pool-mib", str(args.pool_mib),
                "--max-batch", str(args.max_batch), "--max-tokens", str(args.new_tokens)]
    return [sys.executable, "-m", "mlx_lm.server", "--model", model_dir, "--host", "127.0.0.1",
            "--port", str(port), "--decode-concurrency", str(args.max_batch),
            "--prompt-concurrency", str(args.prompt_concurrency), "--max-tokens",
            str(args.new_tokens), *args.mlx_extra.split()]


def run_config(kind: str, n: int, model_dir: str, texts: list[str], warm_texts: list[str],
               bias: dict, args, deadline: float, logdir: Path) -> dict:
    from tqstore.servers import ServerProcess, free_port, http_json, http_ok

    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    logp = logdir / f"{kind}-n{n}.log"
    result: dict = {"server": kind, "n": n}
    base_mib = gpu_used_mib()
    t0 = time.perf_counter()
    argv = server_argv(kind, model_dir, port, args)
    result["argv"] = " ".join(argv[1:])
    srv = ServerProcess(kind, argv, logp)
    poller = None
    try:
        srv.wait_ready(lambda: http_ok(base + "/models"), timeout=args.ready_timeout)
        result["ready_s"] = round(time.perf_counter() - t0, 2)
        poller = Poller(srv.pid, base + "/stats" if kind == "tqstore" else None)
        model = "default_model"
        left = deadline - time.perf_counter()
        t1 = time.perf_counter()
        wrecs, werr = fire(base, model, warm_texts, 8, bias, max(30.0, left))
        result["warmup_s"] = round(time.perf_counter() - t1, 2)
        if werr:
            raise RuntimeError("warm-up failed: " + "; ".join(werr[:3]))
        left = deadline - time.perf_counter()
        if left < 20:
            raise RuntimeError(f"only {left:.0f} s left before the deadline: not started")
        log(f"{kind} N={n}: ready {result['ready_s']} s, warm-up {result['warmup_s']} s; "
            f"firing {n} requests ({left:.0f} s left)")
        recs, errors = fire(base, model, texts, args.new_tokens, bias, left - 10)
        result.update(summarize(recs))
        if errors:
            result["errors"] = errors[:5]
            result["error_count"] = len(errors)
        if recs and recs[0].server_ttft_s is not None:
            st = [r.server_ttft_s for r in recs if r.server_ttft_s is not None]
            result["server_ttft_p50_s"] = round(pct(st, 50), 3)
        if kind == "tqstore":
            try:
                result["stats_end"] = http_json(base + "/stats", timeout=10)
            except Exception as exc:  # noqa: BLE001
                result["stats_end"] = f"unavailable: {exc}"
    except Exception as exc:  # noqa: BLE001 - recorded; the next configuration still runs
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["log_tail"] = srv.log_tail(30)
    finally:
        if poller is not None:
            poller.stop()
            result["gpu_peak_used_mib"] = poller.gpu_peak
            result["gpu_base_used_mib"] = base_mib
            if poller.gpu_peak is not None and base_mib is not None:
                result["gpu_peak_server_mib"] = poller.gpu_peak - base_mib
            result["gpu_app_peak_mib"] = poller.app_peak
            result["gpu_apps_seen"] = sorted(poller.apps_seen)
            if poller.stats_peak:
                result["stats_peak"] = poller.stats_peak
                result["stats_samples"] = poller.stats_samples
        mem = srv.memory()
        if mem:
            result["rss_peak_bytes"] = mem.get("VmHWM")
        result["exit"] = srv.stop(grace=20)
    return result


def table(results: list[dict]) -> str:
    head = (f"{'server':<9} {'N':>3} {'wall s':>8} {'agg tok/s':>10} {'dec sum':>9} "
            f"{'dec union':>10} {'steady':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'GPU MiB':>8} {'tok':>5}")
    lines = [head, "-" * len(head)]
    for r in results:
        if "wall_s" not in r:
            lines.append(f"{r['server']:<9} {r['n']:>3}  ERROR {r.get('error', '')[:90]}")
            continue

        def f(k, w, p=2):
            v = r.get(k)
            return f"{v:>{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"

        lines.append(f"{r['server']:<9} {r['n']:>3} {f('wall_s', 8)} {f('agg_tok_s', 10, 1)} "
                     f"{f('decode_sum_tok_s', 9, 1)} {f('decode_union_tok_s', 10, 1)} "
                     f"{f('steady_decode_tok_s', 8, 1)} "
                     f"{f('ttft_p50_s', 9)} {f('ttft_p95_s', 9)} "
                     f"{f('gpu_peak_server_mib', 8, 0)} {r['completion_tokens']:>5}"
                     + (f"  {r['error_count']} of {r['n']} requests FAILED"
                        if r.get("error_count") else ""))
    # A server whose requests failed (mlx_lm.server out of GPU memory) has no comparable rate:
    # its figures cover only the requests that finished.
    by = {(r["server"], r["n"]): r for r in results
          if "agg_tok_s" in r and not r.get("error_count")}
    for n in sorted({r["n"] for r in results}):
        a, b = by.get(("tqstore", n)), by.get(("mlx_lm", n))
        if a and b:
            ratios = {k: round(a[k] / b[k], 3) for k in ("agg_tok_s", "decode_sum_tok_s",
                                                         "decode_union_tok_s", "ttft_p50_s",
                                                         "steady_decode_tok_s")
                      if a.get(k) and b.get(k)}
            lines.append(f"N={n} ours/mlx_lm: {ratios}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--model-dir", default=os.environ.get("TQSTORE_BENCH_MODEL", ""),
                   help="where the model directory is written (default /tmp/tqstore-bench-SHAPE)")
    p.add_argument("--n", type=int, nargs="+", default=[8, 32])
    p.add_argument("--servers", nargs="+", default=["tqstore", "mlx_lm"],
                   choices=["tqstore", "mlx_lm"])
    p.add_argument("--prompt-tokens", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--pool-mib", type=int, default=12000)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--prompt-concurrency", type=int, default=8,
                   help="mlx_lm.server --prompt-concurrency (its default is 8)")
    p.add_argument("--mlx-extra", default="",
                   help="more mlx_lm.server options, one string (e.g. '--prefill-step-size 512')")
    p.add_argument("--warm-n", type=int, default=0,
                   help="concurrent warm-up requests (default 0: as many as the measured "
                        "configuration's N, so the batched kernels of its sizes compile before "
                        "the timing: MLX's CUDA backend compiles per shape)")
    p.add_argument("--warm-tokens", type=int, default=2304,
                   help="warm-up prompt tokens (default 2304: over mlx_lm.server's 2048-token "
                        "prefill step, so a full step and a remainder are seen)")
    p.add_argument("--ready-timeout", type=float, default=240.0)
    p.add_argument("--deadline-s", type=float, default=540.0,
                   help="whole run, model writing included; configurations not reached by "
                        "then are skipped and in-flight requests time out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-only", action="store_true", help="write the model directory, exit")
    args = p.parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.deadline_s
    model_dir = Path(args.model_dir or f"/tmp/tqstore-bench-{args.shape}")

    if args.write_only:
        import mlx.core as mx

        log(f"mlx {mx.__version__} on {mx.default_device()}")
        write_model(model_dir, args.shape, args.seed)
        return 0
    # The model is written by a child process: this process never touches the GPU, so the
    # servers get all of its memory (MLX's buffer cache would keep the weights' ~14 GB).
    from importlib.metadata import version

    mlx_version = version("mlx")
    log(f"mlx {mlx_version}; GPU: {smi('name,memory.total') or 'none (no nvidia-smi)'}")
    subprocess.run([sys.executable, __file__, "--write-only", "--shape", args.shape,
                    "--model-dir", str(model_dir), "--seed", str(args.seed)], check=True)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    t0 = time.perf_counter()
    pool = ascii_ids(tok)
    eos = set()
    for attr in ("eos_token_id", "pad_token_id"):
        v = getattr(tok, attr, None)
        if isinstance(v, int):
            eos.add(v)
    cfg_eos = json.loads((model_dir / "config.json").read_text()).get("eos_token_id")
    eos.update(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
    bias = {str(i): -100 for i in sorted(eos)}
    rng = random.Random(args.seed)
    prompts = {}  # (server, n) -> texts: every request of the run has its own prompt
    for n in args.n:
        for kind in args.servers:
            prompts[(kind, n)] = [make_prompt(tok, pool, f"{kind}-{n}-{i}-{rng.randrange(10**9)}",
                                              args.prompt_tokens, rng) for i in range(n)]
    warm = {key: [make_prompt(tok, pool, f"warm-{key[0]}-{key[1]}-{i}", args.warm_tokens, rng)
                  for i in range(args.warm_n or key[1])] for key in prompts}
    lens = [chat_len(tok, t) for v in prompts.values() for t in v]
    log(f"{len(lens)} prompts of {min(lens)}..{max(lens)} tokens (mean "
        f"{statistics.mean(lens):.0f}) from {len(pool)} ASCII token ids in "
        f"{time.perf_counter() - t0:.1f} s; logit_bias {bias}")

    out = os.environ.get("OUT")
    logdir = Path(out) if out else Path("/tmp/serve_gpu_bench_logs")
    logdir.mkdir(parents=True, exist_ok=True)
    meta = {"shape": args.shape, "config": json.loads((model_dir / "config.json").read_text()),
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "pool_mib": args.pool_mib, "max_batch": args.max_batch, "logit_bias": bias,
            "mlx": mlx_version, "gpu": smi("name,memory.total,driver_version")}
    results: list[dict] = []
    for n in args.n:
        for kind in args.servers:
            if deadline - time.perf_counter() < 30:
                results.append({"server": kind, "n": n, "error": "skipped: deadline"})
                continue
            r = run_config(kind, n, str(model_dir), prompts[(kind, n)], warm[(kind, n)], bias,
                           args, deadline, logdir)
            results.append(r)
            log(json.dumps({k: v for k, v in r.items() if k not in ("stats_end", "log_tail")}))
            if "log_tail" in r:
                log("server log tail:\n" + r["log_tail"])
            if out:
                Path(out, "serve_gpu_bench.json").write_text(
                    json.dumps({"meta": meta, "results": results}, indent=2))
    print(table(results), flush=True)
    for r in results:
        if r["server"] == "tqstore" and isinstance(r.get("stats_end"), dict):
            s = r["stats_end"]
            print(f"tqstore N={r['n']} /v1/stats at the end: " + json.dumps(
                {k: s.get(k) for k in ("pool_bytes_used", "pool_bytes_budget", "kv_bytes_per_token",
                                       "kv_fp16_bytes_per_token", "totals", "healthy")}))
            print(f"  peaks while running: {r.get('stats_peak')}")
    log(f"total {time.perf_counter() - start:.1f} s")
    return 0 if all("wall_s" in r and not r.get("errors") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
