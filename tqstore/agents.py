"""The agent workload of `tqstore demo` and `tqstore bench serve`, and its client.

N agents share one system prompt; each has its own task and talks for K turns. Every turn sends
the whole transcript (system, task, then alternating assistant answers and tool results), as
agent loops do, so turn k's prompt is turn k-1's prompt plus its answer and one tool result: the
prefix a cache can serve grows every turn.

The texts are excerpts of the documents in tqstore/data (real prose, not random tokens, so the
model's answers look like answers), chosen by a seeded RNG and sized with the model's own
tokenizer, never by a words-per-token guess. Same seed, same tokenizer, same workload: both
servers of a benchmark get byte-identical system prompts, tasks and tool results.

The client is the official `openai` package, streamed with ``include_usage``: TTFT is the time to
the first chunk with content, decode tokens/s the completion tokens after the first over the time
from the first content chunk to the last. ``usage["tqstore"]`` (memory / daemon / computed
tokens, our endpoint's extension) is read when present and left ``None`` when not.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

from tqstore.errors import InvalidArgument

DATA = Path(__file__).resolve().parent / "data"
SYSTEM_SOURCE = "python-stdlib-docstrings.txt"
TASK_SOURCE = "gpl-3.txt"
TOOL_SOURCES = ("python-stdlib-docstrings.txt", "gfdl-1.3.txt")

SYSTEM_HEADER = ("You are a coding agent working in a Python repository. You can call the tools "
                 "read_file, search and run_tests; their results come back as user messages "
                 "that start with 'Tool result'. Answer briefly and say which tool to call "
                 "next. The standard-library reference you may rely on follows.\n\n")
TOOLS = ("read_file", "search", "run_tests")


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class WorkloadConfig:
    """Sizes are in the model's tokens, of the message content (the chat template adds ~5 per
    message). The issue's benchmark is agents=1/4/8, turns=6, 1500/500/200, 64 new tokens."""

    agents: int = 2
    turns: int = 3
    system_tokens: int = 1500
    task_tokens: int = 500
    tool_tokens: int = 200
    max_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("agents", "turns", "max_tokens"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("system_tokens", "task_tokens", "tool_tokens"):
            if getattr(self, name) < 32:
                raise InvalidArgument(f"{name} must be at least 32, not {getattr(self, name)}")


@dataclass(frozen=True)
class Workload:
    """Every text the agents will send, fixed before any server is asked."""

    config: WorkloadConfig
    system: str
    tasks: tuple[str, ...]  # one per agent
    tool_results: tuple[tuple[str, ...], ...]  # per agent, turns - 1 of them (turn k+2 adds [k])
    token_counts: dict[str, Any]  # {"system": n, "tasks": [n...], "tool_results": [[n...]...]}

    def first_messages(self, agent: int) -> list[dict[str, str]]:
        """Turn 1 of an agent: the shared system prompt and its task."""
        return [{"role": "system", "content": self.system},
                {"role": "user", "content": self.tasks[agent]}]


@dataclass
class TurnRecord:
    """One request of one agent. Times are seconds; ``start_s``/``first_token_s``/``end_s`` are
    on the workload's clock (0 = when the agents were released), for aggregate rates."""

    agent: int
    turn: int  # 1-based
    prompt_tokens: int
    cached_tokens: int | None  # usage.prompt_tokens_details.cached_tokens
    memory_tokens: int | None  # usage["tqstore"], our endpoint only
    daemon_tokens: int | None
    computed_tokens: int | None
    ttft_s: float
    completion_tokens: int
    decode_tokens_per_s: float | None  # None with a single content chunk
    wall_s: float
    start_s: float
    first_token_s: float
    end_s: float
    text: str = field(repr=False, default="")

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "text"}


def content_tokens(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def sized_excerpt(tokenizer: Tokenizer, header: str, words: Sequence[str], start: int,
                  target: int) -> tuple[str, int]:
    """``header`` plus the most whole words of ``words[start:]`` (wrapping around) that keep it
    at or under ``target`` tokens; returns the text and its token count. Binary search on the
    word count: tokens per word vary 1.3-2.5x across these texts."""
    ring = list(words[start:]) + list(words[:start])

    def text(n: int) -> str:
        return header + " ".join(ring[:n])

    if content_tokens(tokenizer, text(len(ring))) <= target:
        raise InvalidArgument(f"the text holds fewer than {target} tokens")
    lo, hi = 0, len(ring)  # invariant: text(lo) fits (or lo == 0), text(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if content_tokens(tokenizer, text(mid)) <= target:
            lo = mid
        else:
            hi = mid
    out = text(lo)
    return out, content_tokens(tokenizer, out)


def _words(name: str) -> list[str]:
    return (DATA / name).read_text().split(" ")


def build_workload(tokenizer: Tokenizer, config: WorkloadConfig) -> Workload:
    """The workload's texts for ``config``, sized with ``tokenizer`` (the served model's)."""
    rng = random.Random(config.seed)
    system, n_system = sized_excerpt(tokenizer, SYSTEM_HEADER, _words(SYSTEM_SOURCE), 0,
                                     config.system_tokens)
    task_words = _words(TASK_SOURCE)
    tool_words = {name: _words(name) for name in TOOL_SOURCES}
    tasks, n_tasks, tools, n_tools = [], [], [], []
    for agent in range(config.agents):
        # The agent's number opens its task, so two tasks never share a prefix past the system
        # prompt, whatever excerpts the RNG picks.
        header = (f"Agent {agent + 1}, task {rng.randrange(1000, 10000)}: a user pasted the "
                  "text below and asks what it permits and what the repository must change "
                  "to comply. Work through it with the tools.\n\n")
        text, n = sized_excerpt(tokenizer, header, task_words, rng.randrange(len(task_words)),
                                config.task_tokens)
        tasks.append(text)
        n_tasks.append(n)
        mine, counts = [], []
        for call in range(config.turns - 1):
            tool = TOOLS[rng.randrange(len(TOOLS))]
            source = TOOL_SOURCES[rng.randrange(len(TOOL_SOURCES))]
            words = tool_words[source]
            header = f"Tool result ({tool}, call {call + 1} of agent {agent + 1}):\n\n"
            text, n = sized_excerpt(tokenizer, header, words, rng.randrange(len(words)),
                                    config.tool_tokens)
            mine.append(text)
            counts.append(n)
        tools.append(tuple(mine))
        n_tools.append(counts)
    return Workload(config, system, tuple(tasks), tuple(tools),
                    {"system": n_system, "tasks": n_tasks, "tool_results": n_tools})


def load_tokenizer(model_dir: str) -> Tokenizer:
    """The tokenizer of an mlx-lm model directory, without its weights."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def prompt_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    """Tokens of a chat prompt as a server builds it (template, generation prompt)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return len(ids)


def stream_turn(client: Any, model: str, messages: list[dict[str, str]], max_tokens: int,
                clock: Callable[[], float] = time.perf_counter, origin: float = 0.0,
                agent: int = 0, turn: int = 1) -> TurnRecord:
    """One streamed chat completion at temperature 0; its timings and usage as a record."""
    start = clock()
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True})
    first = last = None
    pieces: list[str] = []
    usage = None
    with stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                now = clock()
                first = now if first is None else first
                last = now
                pieces.append(chunk.choices[0].delta.content)
            if getattr(chunk, "usage", None) is not None:
                usage = chunk.usage
    end = clock()
    if usage is None:
        # Asked for with include_usage; a stream that ends without it was cut short (a server
        # that failed mid-answer closes the stream without an error event).
        raise RuntimeError(f"agent {agent + 1} turn {turn}: the stream ended without its usage "
                           "chunk (the server failed mid-answer? see its log)")
    if first is None:  # no content at all (an immediate end of sequence)
        first = last = end
    dump = usage.model_dump()
    details = dump.get("prompt_tokens_details") or {}
    tiers = dump.get("tqstore") or {}
    completion = int(dump.get("completion_tokens") or 0)
    decode = (completion - 1) / (last - first) if completion > 1 and last > first else None
    return TurnRecord(
        agent=agent, turn=turn, prompt_tokens=int(dump.get("prompt_tokens") or 0),
        cached_tokens=details.get("cached_tokens"), memory_tokens=tiers.get("memory_tokens"),
        daemon_tokens=tiers.get("daemon_tokens"), computed_tokens=tiers.get("computed_tokens"),
        ttft_s=first - start, completion_tokens=completion, decode_tokens_per_s=decode,
        wall_s=end - start, start_s=start - origin, first_token_s=first - origin,
        end_s=end - origin, text="".join(pieces))


def make_client(base_url: str, timeout_s: float = 900.0) -> Any:
    """An `openai.OpenAI` client for a local server: no retries (a retry would hide a failure
    inside a timing), a long timeout (CPU prefill of thousands of tokens takes minutes)."""
    import openai

    return openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=timeout_s)


@dataclass(frozen=True)
class AgentRun:
    """What `run_agents` returns: the records (in completion order) and its clock: records'
    ``*_s`` fields are seconds after ``origin`` (a `time.perf_counter` value)."""

    records: list[TurnRecord]
    origin: float
    wall_s: float


def run_agents(base_url: str, workload: Workload, model: str = "default_model",
               turns: int | None = None, agents: Sequence[int] | None = None,
               on_record: Callable[[TurnRecord], None] | None = None,
               stagger: bool = False) -> AgentRun:
    """Run ``agents`` (default: all) concurrently, one thread each, for ``turns`` (default: the
    workload's). Each turn waits for the agent's previous answer. With ``stagger`` the other
    agents send their first request only once the first agent's first turn has ended (the
    shared system prompt is then cached somewhere, as when agents start over time). ``on_record``
    is called (under a lock) as each turn ends. The first failure of any agent is raised once
    every thread has stopped."""
    config = workload.config
    turns = config.turns if turns is None else turns
    if not 1 <= turns <= config.turns:
        raise InvalidArgument(f"turns must be 1..{config.turns}, not {turns}")
    chosen = list(range(config.agents)) if agents is None else list(agents)
    records: list[TurnRecord] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    release = threading.Barrier(len(chosen) + 1)
    leader_done = threading.Event()
    origin: list[float] = []

    def agent_loop(agent: int) -> None:
        release.wait()
        client = None
        try:
            client = make_client(base_url)
            messages = workload.first_messages(agent)
            if stagger and agent != chosen[0]:
                leader_done.wait()
            for turn in range(1, turns + 1):
                if errors:
                    return
                record = stream_turn(client, model, messages, config.max_tokens,
                                     origin=origin[0], agent=agent, turn=turn)
                with lock:
                    records.append(record)
                    if on_record is not None:
                        on_record(record)
                if agent == chosen[0]:
                    leader_done.set()
                if turn < turns:
                    messages = messages + [
                        {"role": "assistant", "content": record.text},
                        {"role": "user", "content": workload.tool_results[agent][turn - 1]}]
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
            with lock:
                errors.append(exc)
        finally:
            leader_done.set()  # never leave the others waiting on a leader that failed
            if client is not None:
                client.close()

    threads = [threading.Thread(target=agent_loop, args=(a,), name=f"agent-{a + 1}", daemon=True)
               for a in chosen]
    for t in threads:
        t.start()
    origin.append(time.perf_counter())
    release.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - origin[0]
    if errors:
        raise errors[0]
    return AgentRun(records, origin[0], wall)


def covered_seconds(spans: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals."""
    busy, cur_lo, cur_hi = 0.0, None, None
    for lo, hi in sorted(spans):
        if cur_hi is None or lo > cur_hi:
            busy += 0.0 if cur_hi is None else cur_hi - cur_lo
            cur_lo, cur_hi = lo, hi
        else:
            cur_hi = max(cur_hi, hi)
    if cur_hi is not None:
        busy += cur_hi - cur_lo
    return busy


def aggregate_decode_tokens_per_s(records: Sequence[TurnRecord]) -> float | None:
    """Tokens decoded after each request's first, over the time at least one request was
    decoding (the union of the [first token, end] intervals): the rate the server sustains
    while it has decode work, not diluted by stretches of pure prefill."""
    busy = covered_seconds((r.first_token_s, r.end_s) for r in records
                           if r.completion_tokens > 1)
    tokens = sum(r.completion_tokens - 1 for r in records if r.completion_tokens > 1)
    return tokens / busy if busy > 0 else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
