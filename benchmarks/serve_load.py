"""Load test for `bitnet158 serve`: N concurrent clients stream completions; prints a table and writes
JSON with aggregate tokens/s, time to first token (TTFT) and inter-token latency (ITL), p50 and p99.

    bitnet158 serve --port 8000 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 1,32 --out serve_load.json

Each client sends `--requests` streaming requests one after another (greedy, `--max-tokens` each).
`--processes P` spreads the clients over P processes, so that parsing the streams does not make the load
generator the bottleneck: each run reports how busy its busiest client process was (`client_cpu_max`, the
share of one core). A client process near 1.0 delays the chunks it reads, and its ITL says more about
itself than about the server.
`--prompt-tokens N` puts about N tokens of code before each prompt, to measure long prompts' TTFT.
TTFT runs from sending a request to its first text; ITL is the gap between consecutive text chunks of
one stream (one chunk per token, except where text is held back at a possible stop string or a split
UTF-8 character).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from threading import BrokenBarrierError

import httpx

PROMPTS = ["import os\n", "class Stack:\n", "def main():\n", "from typing import", "import unittest\n\nclass",
           "# Copyright", "def __init__(self", "if __name__ == '__main__':\n", "try:\n    import", "with open("]


# Filler for long prompts: 36 tokens with the embedded model's tokenizer (the summary reports the real counts).
FILLER = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n\n"


@dataclass
class Stream:
    ttft: float
    gaps: list[float]
    tokens: int
    prompt_tokens: int


@dataclass
class Run:
    clients: int
    processes: int
    wall: float
    client_cpu_max: float  # CPU time over wall time of the busiest client process
    streams: list[Stream] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        ttft = [s.ttft for s in self.streams]
        gaps = [g for s in self.streams for g in s.gaps]
        tokens = sum(s.tokens for s in self.streams)
        return {
            "clients": self.clients,
            "processes": self.processes,
            "client_cpu_max": round(self.client_cpu_max, 2),
            "requests": len(self.streams),
            "prompt_tokens_mean": round(sum(s.prompt_tokens for s in self.streams) / len(self.streams), 1),
            "tokens": tokens,
            "wall_s": round(self.wall, 3),
            "aggregate_tokens_per_s": round(tokens / self.wall, 2),
            "ttft_p50_ms": round(1000 * percentile(ttft, 50), 1),
            "ttft_p99_ms": round(1000 * percentile(ttft, 99), 1),
            "itl_p50_ms": round(1000 * percentile(gaps, 50), 1),
            "itl_p99_ms": round(1000 * percentile(gaps, 99), 1),
        }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linearly interpolated between the closest ranks (numpy's default); NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def one_stream(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Stream:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    arrivals: list[float] = []
    tokens = prompt_tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                prompt_tokens = chunk["usage"]["prompt_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return Stream(ttft=arrivals[0] - sent if arrivals else float("nan"), gaps=gaps, tokens=tokens,
                  prompt_tokens=prompt_tokens)


async def run_clients(url: str, headers: dict[str, str], first: int, clients: int, requests: int, max_tokens: int,
                      prefix: str, ready: Barrier) -> tuple[list[Stream], float, float, float]:
    """Clients `first, first + 1, ...` of a run: (their streams, start, end, CPU time), once every process is ready."""
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await one_stream(client, model, PROMPTS[0], 4)  # warm-up

        async def client_loop(index: int) -> list[Stream]:
            return [await one_stream(client, model, prefix + PROMPTS[(index + r) % len(PROMPTS)], max_tokens)
                    for r in range(requests)]

        ready.wait()
        cpu, started = time.process_time(), time.perf_counter()
        results = await asyncio.gather(*(client_loop(first + i) for i in range(clients)))
        ended = time.perf_counter()
    return [s for streams in results for s in streams], started, ended, time.process_time() - cpu


def client_process(ready: Barrier, results: multiprocessing.Queue, *args) -> None:
    """Put this process's part of the run, or the line that says why it failed."""
    try:
        results.put(asyncio.run(run_clients(*args, ready)))
    except BrokenBarrierError:
        results.put("another client process failed")
    except Exception as error:  # noqa: BLE001 - the parent reports it as one line
        ready.abort()  # the other processes stop waiting for this one
        results.put(f"{type(error).__name__}: {error}")


def run(url: str, headers: dict[str, str], clients: int, processes: int, requests: int, max_tokens: int,
        prefix: str) -> Run:
    """`clients` clients spread over `processes` processes that start together; the wall time runs from the
    first start to the last end (perf_counter is one clock for all processes)."""
    processes = min(processes, clients)
    ready, results = multiprocessing.Barrier(processes), multiprocessing.Queue()
    shares = [clients // processes + (p < clients % processes) for p in range(processes)]
    workers = [multiprocessing.Process(target=client_process, args=(
        ready, results, url, headers, sum(shares[:p]), shares[p], requests, max_tokens, prefix))
        for p in range(processes)]
    for worker in workers:
        worker.start()
    parts = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    failures = sorted((part for part in parts if isinstance(part, str)), key=lambda f: f.startswith("another"))
    if failures:
        raise SystemExit(f"serve_load: a client failed against {url}: {failures[0]}")
    wall = max(end for _, _, end, _ in parts) - min(start for _, start, _, _ in parts)
    busiest = max(cpu / (end - start) for _, start, end, cpu in parts)
    return Run(clients, processes, wall, busiest, [s for streams, _, _, _ in parts for s in streams])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", default="1,32", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--processes", type=int, default=1, help="client processes to spread the clients over")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=0, help="tokens of code before each prompt")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--out", default="serve_load.json", help="where to write the JSON results")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    prefix = FILLER * round(args.prompt_tokens / 36)

    rows = []
    for clients in (int(c) for c in args.clients.split(",")):
        rows.append(run(args.url, headers, clients, args.processes, args.requests, args.max_tokens, prefix).summary())
    columns = list(rows[0])
    print(" | ".join(f"{c:>22}" for c in columns))
    for row in rows:
        print(" | ".join(f"{row[c]:>22}" for c in columns))
    if len(rows) > 1:
        base = rows[0]
        for row in rows[1:]:
            print(f"{row['clients']} vs {base['clients']} clients: aggregate tokens/s x"
                  f"{row['aggregate_tokens_per_s'] / base['aggregate_tokens_per_s']:.2f}, "
                  f"ITL p99 x{row['itl_p99_ms'] / base['itl_p99_ms']:.2f}")
    with open(args.out, "w") as file:
        json.dump({"url": args.url, "max_tokens": args.max_tokens, "requests_per_client": args.requests,
                   "processes": args.processes,
                   "prompt_tokens": args.prompt_tokens, "runs": rows}, file, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
