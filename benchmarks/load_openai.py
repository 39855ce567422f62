"""Load an OpenAI-compatible server with the official `openai` client and print what clients see.

For each concurrency C, C clients (split over --procs processes, so the clients' own Python is not the
bottleneck) start together; each streams `--rounds` completions of `--max-tokens` tokens (ignore_eos, so
every request is the same length). One table row per C: tok/s over the wall time, p50/p99 request latency,
p50/p99 time to first token, dropped requests (no complete reply: connection reset, timeout, HTTP
error), and on a moetune server its mean engine step during the level (from /metrics). With
--engine-results (the JSON `python -m moetune.serve` writes) a column gives tok/s as a share of the
engine's own decode rate at batch C.

This starts nothing unless --spawn-tiny is given, which runs `python -m moetune.serve --model tiny` on the
CPU for the duration (for checking the script; its numbers mean nothing).

    python benchmarks/load_openai.py --base-url http://127.0.0.1:8000/v1 --concurrency 64,256 \\
        --engine-results runs/serve/serve_mixtral-8x7b_fp8_NVIDIA_H100_80GB_HBM3.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import Manager
from pathlib import Path
from typing import Any

import httpx
import openai

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


@dataclass
class Level:
    concurrency: int
    wall_s: float = 0.0
    tokens: int = 0
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    dropped: int = 0
    first_error: str = ""
    step_ms: float = float("nan")  # the server's mean engine step during the level (moetune servers only)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def one_request(client: openai.AsyncOpenAI, model: str, max_tokens: int, level: Level) -> None:
    t0 = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = await client.completions.create(
            model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text and first is None:
                first = time.perf_counter() - t0
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # any request without a whole reply counts as dropped
        level.dropped += 1
        level.first_error = level.first_error or f"{type(e).__name__}: {e}"
        return
    level.latency.append(time.perf_counter() - t0)
    level.ttft.append(first if first is not None else float("nan"))
    level.tokens += tokens


def run_level(base_url: str, model: str, concurrency: int, rounds: int, max_tokens: int, procs: int) -> Level:
    """concurrency clients split over `procs` processes, so the clients' own Python is not what is measured."""
    if procs <= 1:
        return asyncio.run(clients(base_url, model, concurrency, rounds, max_tokens))
    shares = [c for c in (concurrency // procs + (i < concurrency % procs) for i in range(procs)) if c]
    # A barrier: each process imports openai and builds its client first, then all start together. Staggered
    # starts (up to a second apart, measured) made the engine interleave prefills with the others' decode.
    with Manager() as manager, ProcessPoolExecutor(len(shares)) as pool:
        start = manager.Barrier(len(shares))
        args = [(base_url, model, c, rounds, max_tokens, start) for c in shares]
        parts = list(pool.map(_clients_sync, *zip(*args)))
    level = Level(concurrency, wall_s=max(p.wall_s for p in parts))
    for part in parts:
        level.tokens += part.tokens
        level.latency += part.latency
        level.ttft += part.ttft
        level.dropped += part.dropped
        level.first_error = level.first_error or part.first_error
    return level


def _clients_sync(base_url: str, model: str, concurrency: int, rounds: int, max_tokens: int, start: Any) -> Level:
    return asyncio.run(clients(base_url, model, concurrency, rounds, max_tokens, start))


async def clients(base_url: str, model: str, concurrency: int, rounds: int, max_tokens: int,
                  start: Any = None) -> Level:  # fmt: skip
    """start: a barrier shared with the other client processes, passed once everything is set up."""
    level = Level(concurrency)
    http = openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=concurrency + 8))  # no client waits
    async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=1800,
                                  http_client=http) as client:  # fmt: skip

        async def worker() -> None:
            for _ in range(rounds):
                await one_request(client, model, max_tokens, level)

        if start is not None:
            await asyncio.to_thread(start.wait)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        level.wall_s = time.perf_counter() - t0
    return level


def engine_steps(base_url: str) -> tuple[float, float] | None:
    """(sum seconds, count) of moetune's engine-step histogram from /metrics; None on servers without it."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        text = httpx.get(f"{root}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    vals = {}
    for line in text.splitlines():
        for key in ("moetune_engine_step_seconds_sum", "moetune_engine_step_seconds_count"):
            if line.startswith(key + " "):
                vals[key] = float(line.split()[1])
    if len(vals) < 2:
        return None
    return vals["moetune_engine_step_seconds_sum"], vals["moetune_engine_step_seconds_count"]


def engine_rates(path: Path | None) -> dict[int, float]:
    """batch -> the tuned table's decode tok/s from `python -m moetune.serve`'s results JSON."""
    if path is None:
        return {}
    return {row["batch"]: row["tuned_tok_s"] for row in json.loads(path.read_text())["decode"]}


def table(levels: list[Level], engine: dict[int, float]) -> str:
    head = (f"{'concurrency':>11} {'requests':>8} {'tok/s':>9} {'p50 lat s':>9} {'p99 lat s':>9} "
            f"{'p50 TTFT s':>10} {'p99 TTFT s':>10} {'dropped':>7} {'step ms':>7}"
            + (f" {'engine tok/s':>12} {'share':>6}" if engine else ""))  # fmt: skip
    lines = [head]
    for lv in levels:
        rate = lv.tokens / lv.wall_s if lv.wall_s else 0.0
        line = (f"{lv.concurrency:>11} {len(lv.latency) + lv.dropped:>8} {rate:>9.1f} {pct(lv.latency, .5):>9.2f} "
                f"{pct(lv.latency, .99):>9.2f} {pct(lv.ttft, .5):>10.3f} {pct(lv.ttft, .99):>10.3f} {lv.dropped:>7} "
                f"{lv.step_ms:>7.1f}")
        if engine:
            e = engine.get(lv.concurrency)
            line += f" {e:>12.1f} {rate / e:>6.0%}" if e else f" {'-':>12} {'-':>6}"
        lines.append(line)
    return "\n".join(lines)


def spawn_tiny() -> tuple[subprocess.Popen, str]:
    """`python -m moetune.serve --model tiny` on a free port; its URL once it listens."""
    cmd = [sys.executable, "-m", "moetune.serve", "--model", "tiny", "--no-compare", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # ends when the process does
        if line.startswith("serving "):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # a full pipe would stall the server
            return proc, line.split(" at ")[1].split()[0]
    proc.wait()
    raise SystemExit(f"the tiny server did not start (exit {proc.returncode})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", help="the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--spawn-tiny", action="store_true", help="start the CPU tiny server for this run instead")
    p.add_argument("--concurrency", default="64,256", help="comma-separated client counts (default 64,256)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1, help="requests per client (default 1)")
    p.add_argument("--procs", type=int, default=4, help="client processes the clients are split over (default 4)")
    p.add_argument("--model", help="model id (default: the server's first)")
    p.add_argument("--engine-results", type=Path, help="serve results JSON: adds the engine's decode tok/s")
    args = p.parse_args(argv)
    if bool(args.base_url) == args.spawn_tiny:
        p.error("give exactly one of --base-url and --spawn-tiny")
    proc, url = spawn_tiny() if args.spawn_tiny else (None, args.base_url)
    try:
        model = args.model or openai.OpenAI(base_url=url, api_key="none").models.list().data[0].id
        levels = []
        for c in (int(x) for x in args.concurrency.split(",")):
            before = engine_steps(url)
            levels.append(run_level(url, model, c, args.rounds, args.max_tokens, args.procs))
            after = engine_steps(url)
            if before and after and after[1] > before[1]:
                levels[-1].step_ms = 1000 * (after[0] - before[0]) / (after[1] - before[1])
            if levels[-1].first_error:
                print(f"concurrency {c}: first error: {levels[-1].first_error}", file=sys.stderr)
        print(f"{model} at {url}, {args.max_tokens} tokens per request, {args.rounds} per client")
        print(table(levels, engine_rates(args.engine_results)))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return 1 if any(lv.dropped for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
