"""Which requests run: a waiting queue (bounded by the HTTP side), a fixed set of cache slots, admission
and retirement.

The scheduler knows nothing about the model; the engine asks it, before each step, which prompt
tokens go into the step and which requests decode, and tells it when a request is done. A step's
prompt tokens are bounded (`max_prefill_tokens`), so that arrivals do not stall the requests already
decoding for long. The runner says how a prompt is cut: in chunks (the native CPU path: any length;
CUDA's short prompts: one token), spread over several steps, or whole (the PyTorch path, CUDA's long
prompts), at least one per step.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from bitnet158.serve.request import Request


class Scheduler:
    def __init__(self, max_batch: int, max_prefill_tokens: int) -> None:
        self.max_prefill_tokens = max_prefill_tokens  # prompt tokens per step
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self.free_slots = list(range(max_batch - 1, -1, -1))  # popped from the end: slot 0 first
        self.lock = threading.Lock()
        self.has_work = threading.Condition(self.lock)

    def submit(self, request: Request) -> None:
        with self.lock:
            self.waiting.append(request)
            self.has_work.notify()

    def wake(self) -> None:
        """Called after a cancellation, so that the engine frees the slot now even if it was idle."""
        with self.lock:
            self.has_work.notify()

    def wait_for_work(self, timeout: float) -> None:
        with self.lock:
            if not self.waiting and not self.running:
                self.has_work.wait(timeout)

    def drop_cancelled(self) -> list[Request]:
        """Remove cancelled requests, waiting or running; running ones give their slot back."""
        with self.lock:
            dropped = [r for r in self.waiting if r.cancelled]
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
            for slot, request in list(self.running.items()):
                if request.cancelled:
                    dropped.append(request)
                    self._free(slot)
            return dropped

    def admit(self, chunk: Callable[[int], int | None]) -> list[tuple[Request, list[int]]]:
        """This step's prompt tokens, oldest request first: the rest of prompts already in a slot, then
        waiting requests moved into free slots, up to `max_prefill_tokens` in all. `chunk(n)`: at most
        this many tokens of an n-token prompt; None: the prompt goes whole (the step's first even past
        the budget)."""
        work: list[tuple[Request, list[int]]] = []
        budget = self.max_prefill_tokens
        with self.lock:
            for request in self.running.values():
                if budget > 0 and request.prompt_done < len(request.prompt_ids):
                    budget -= self._take(request, budget, chunk(len(request.prompt_ids)), work)
            while budget > 0 and self.waiting and self.free_slots:
                length = len(self.waiting[0].prompt_ids)
                if chunk(length) is None and work and length > budget:
                    break
                request = self.waiting.popleft()
                request.slot = self.free_slots.pop()
                self.running[request.slot] = request
                budget -= self._take(request, budget, chunk(length), work)
        return work

    @staticmethod
    def _take(request: Request, budget: int, chunk: int | None, work: list[tuple[Request, list[int]]]) -> int:
        start = request.prompt_done
        end = len(request.prompt_ids)
        if chunk is not None:
            end = min(end, start + min(budget, chunk))
        work.append((request, request.prompt_ids[start:end]))
        request.prompt_done = end
        return end - start

    def decoding(self) -> list[Request]:
        """The running requests that decode in the next step: those with a sampled token to feed and tokens to
        go (one that has drawn `max_new_tokens` ends by length, even before the engine has seen its last token)."""
        with self.lock:
            return [r for r in self.running.values() if 0 < r.sampled < r.params.max_new_tokens]

    def all_running(self) -> list[Request]:
        with self.lock:
            return list(self.running.values())

    def retire(self, request: Request) -> None:
        with self.lock:
            if self.running.get(request.slot) is request:
                self._free(request.slot)

    def _free(self, slot: int) -> None:
        del self.running[slot]
        self.free_slots.append(slot)

    def counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self.lock:
            return len(self.running), len(self.waiting)
