"""`tqstore demo [--path DIR]`: the product as users meet it. Starts the prefix-cache daemon on a
temp store (or --path, kept) and the OpenAI-compatible endpoint on the bundled model, as the
processes a user would run, on free loopback ports; then two agents that share a system prompt
talk to the endpoint for a few turns (tqstore.agents), each turn sending the whole transcript.
Every turn prints its prompt length, TTFT and where the prompt came from: pages already in
memory, blocks fetched from the daemon, or computed. Then the endpoint restarts (its memory is
gone, the daemon keeps the store) and turn 1 of both agents is replayed: a daemon hit."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tqstore.agents import WorkloadConfig
from tqstore.cli.connection_args import add_token_argument

# Sized to finish in under 2 minutes on the 2-core CPU machine, model loads included.
DEMO = WorkloadConfig(agents=2, turns=3, system_tokens=1000, task_tokens=250, tool_tokens=120,
                      max_tokens=16, seed=0)
HEADER = f"{'agent':>5} {'turn':>4} {'prompt':>6} {'TTFT s':>7} {'memory':>6} {'daemon':>6} " \
         f"{'computed':>8}  answer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", help="store directory, kept afterwards (default: a temp dir, "
                                       "removed when the demo ends)")
    parser.add_argument("--model", help="mlx-lm model directory (default: the bundled "
                                        "SmolLM2-135M-Instruct, exported once to the user cache)")
    parser.add_argument("--turns", type=int, default=DEMO.turns,
                        help=f"turns per agent (default {DEMO.turns})")
    parser.add_argument("--system-tokens", type=int, default=DEMO.system_tokens,
                        help=f"the agents' shared system prompt, tokens (default "
                             f"{DEMO.system_tokens})")
    parser.add_argument("--task-tokens", type=int, default=DEMO.task_tokens,
                        help=f"each agent's task, tokens (default {DEMO.task_tokens})")
    parser.add_argument("--tool-tokens", type=int, default=DEMO.tool_tokens,
                        help=f"each tool result, tokens (default {DEMO.tool_tokens})")
    parser.add_argument("--max-tokens", type=int, default=DEMO.max_tokens,
                        help=f"tokens each answer may have (default {DEMO.max_tokens})")
    add_token_argument(parser, help_text="make the demo's daemon require the bearer token in FILE "
                                         "(chmod 600) and its endpoint send it")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _row(r) -> str:
    answer = r.text.strip().replace("\n", " ")
    answer = answer if len(answer) <= 40 else answer[:39] + "…"
    return (f"{r.agent + 1:>5} {r.turn:>4} {r.prompt_tokens:>6} {r.ttft_s:>7.2f} "
            f"{_n(r.memory_tokens):>6} {_n(r.daemon_tokens):>6} {_n(r.computed_tokens):>8}  "
            f"{answer!r}")


def _n(x: int | None) -> str:
    return "-" if x is None else str(x)


def run(args: argparse.Namespace) -> int:
    # A temp store goes when the demo ends, however it ends; so do the servers' logs.
    path = args.path or tempfile.mkdtemp(prefix="tqstore-demo-")
    logs = Path(tempfile.mkdtemp(prefix="tqstore-demo-logs-"))
    try:
        return _run(args, path, logs)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
        if not args.path:
            shutil.rmtree(path, ignore_errors=True)


def _token_args(token_file: str | None) -> list[str]:
    return [] if token_file is None else ["--token-file", str(Path(token_file).resolve())]


def _start_endpoint(model_dir: str, daemon_addr: str, logs: Path, n: int,
                    token_file: str | None = None):
    from tqstore.servers import ServerProcess, free_port, http_ok, tqstore_argv

    port = free_port()
    endpoint = ServerProcess("tqstore openai", tqstore_argv(
        "openai", "--model", model_dir, "--store", daemon_addr, "--host", "127.0.0.1",
        "--port", str(port), *_token_args(token_file)), logs / f"openai-{n}.log")
    root = f"http://127.0.0.1:{port}"
    waited = endpoint.wait_ready(lambda: http_ok(root + "/health"), 300)
    return endpoint, root + "/v1", waited


def _run(args: argparse.Namespace, path: str, logs: Path) -> int:
    from tqstore.agents import build_workload, load_tokenizer, run_agents
    from tqstore.servers import (ServerProcess, free_port, served_model, tcp_open, tqstore_argv,
                                 warm_up)

    started = time.perf_counter()
    if args.model:
        model_dir = str(Path(args.model).expanduser().resolve())
    else:
        from tqstore.models.export import bundled_model_dir

        _say("[1/5] the bundled SmolLM2-135M-Instruct as an mlx-lm model directory")
        model_dir = str(bundled_model_dir())
    config = WorkloadConfig(agents=2, turns=args.turns, system_tokens=args.system_tokens,
                            task_tokens=args.task_tokens, tool_tokens=args.tool_tokens,
                            max_tokens=args.max_tokens, seed=DEMO.seed)
    workload = build_workload(load_tokenizer(model_dir), config)
    counts = workload.token_counts
    procs: list[ServerProcess] = []
    try:
        dport = free_port()
        daemon_addr = f"127.0.0.1:{dport}"
        _say(f"[2/5] starting the daemon on {path}: tqstore serve --path {path} "
             f"--listen {daemon_addr}")
        daemon = ServerProcess("tqstore serve", tqstore_argv(
            "serve", "--path", path, "--listen", daemon_addr, *_token_args(args.token_file)),
            logs / "daemon.log")
        procs.append(daemon)
        daemon.wait_ready(lambda: tcp_open("127.0.0.1", dport), 120)
        _say(f"[3/5] starting the endpoint: tqstore openai --model {model_dir} "
             f"--store {daemon_addr}")
        endpoint, base_url, waited = _start_endpoint(model_dir, daemon_addr, logs, 1,
                                                     args.token_file)
        procs.append(endpoint)
        model = served_model(base_url)
        warm_up(base_url, model)
        _say(f"      {base_url} up in {waited:.1f} s")
        _say(f"[4/5] two agents, {config.turns} turns each: a shared {counts['system']}-token "
             f"system prompt, their own ~{config.task_tokens}-token tasks, then each turn "
             f"appends the answer (<= {config.max_tokens} tokens) and a "
             f"~{config.tool_tokens}-token tool result")
        print(HEADER, flush=True)
        first = run_agents(base_url, workload, model, stagger=True,
                           on_record=lambda r: print(_row(r), flush=True))
        endpoint.stop()
        procs.remove(endpoint)
        _say("[5/5] restarting the endpoint (its memory is gone; the daemon keeps the store) and "
             "replaying turn 1 of both agents")
        endpoint, base_url, waited = _start_endpoint(model_dir, daemon_addr, logs, 2,
                                                     args.token_file)
        procs.append(endpoint)
        warm_up(base_url, model)
        print(HEADER, flush=True)
        replay = run_agents(base_url, workload, model, turns=1, stagger=True,
                            on_record=lambda r: print(_row(r), flush=True))
    except BaseException:
        for p in procs:
            tail = p.log_tail(15)
            if tail:
                _say(f"--- {p.name} log (last lines) ---\n{tail}")
        raise
    finally:
        for p in reversed(procs):
            p.stop()
    cold = {r.agent: r for r in first.records if r.turn == 1}
    again = {r.agent: r for r in replay.records}
    later = [r for r in first.records if r.turn >= 2]
    print()
    for agent in sorted(again):
        c, h = cold[agent], again[agent]
        print(f"agent {agent + 1} turn 1: TTFT {c.ttft_s:.2f} s before the restart, "
              f"{h.ttft_s:.2f} s after it ({_n(h.daemon_tokens)} of {h.prompt_tokens} prompt "
              f"tokens from the daemon, {_n(h.memory_tokens)} from memory); same answer: "
              f"{'yes' if c.text == h.text else 'no'}")
    if later:
        cached = sum((r.memory_tokens or 0) + (r.daemon_tokens or 0) for r in later)
        print(f"turns 2-{config.turns}: {cached} of {sum(r.prompt_tokens for r in later)} prompt "
              f"tokens served from the cache")
    print(f"demo took {time.perf_counter() - started:.0f} s")
    return 0
