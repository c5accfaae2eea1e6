"""Which requests run: a bounded waiting queue, a fixed set of cache slots, admission and retirement.

The scheduler knows nothing about the model; the engine asks it, between decode steps, which
requests to prefill now and which are running, and tells it when a request is done.
"""

from __future__ import annotations

import threading
from collections import deque

from bitnet158.serve.request import Request


class QueueFull(Exception):
    """The waiting queue is at `max_queue`: the server answers 429."""


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int, max_prefill_tokens: int) -> None:
        self.max_queue = max_queue
        # Prompt tokens prefilled between two decode steps (at least one request): bounds the stall
        # that new arrivals cause to the requests already decoding.
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self.free_slots = list(range(max_batch - 1, -1, -1))  # popped from the end: slot 0 first
        self.lock = threading.Lock()
        self.has_work = threading.Condition(self.lock)

    def submit(self, request: Request) -> None:
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull
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

    def admit(self) -> list[Request]:
        """Move waiting requests into free slots, oldest first, up to the prefill token budget."""
        admitted: list[Request] = []
        budget = self.max_prefill_tokens
        with self.lock:
            while self.waiting and self.free_slots:
                prompt_tokens = len(self.waiting[0].prompt_ids)
                if admitted and prompt_tokens > budget:
                    break
                request = self.waiting.popleft()
                request.slot = self.free_slots.pop()
                self.running[request.slot] = request
                admitted.append(request)
                budget -= prompt_tokens
        return admitted

    def decoding(self, exclude: list[Request]) -> list[Request]:
        """The running requests that take part in the next decode step (not those just prefilled)."""
        with self.lock:
            return [r for r in self.running.values() if r not in exclude]

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
