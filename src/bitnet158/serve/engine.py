"""The engine loop, in the engine process (`engine_process.py`): each step it drops cancelled requests, feeds
the model the step's prompt tokens (of newly admitted requests, or the rest of long prompts) together with one
token of every decoding request, samples a token for each request that has logits, and retires those that have
finished. Each step's events go out in one batch (`emit`), with the numbers the metrics need.

On CUDA the steps overlap the host's work ("async scheduling"): the engine launches step N+1, whose
decoding rows read their tokens from step N's on the GPU, and only then waits for step N's tokens, sends
their text and retires finished requests, while the GPU computes step N+1. A request that ends at step N on
EOS or a stop string has already got a row in step N+1: that row is wasted, its token discarded (its cache
write lands in its own slot, released afterwards, and a later user of the slot writes after it in the GPU's
order). One that ends by length gets no extra row: the scheduler knows how many tokens it has drawn.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from bitnet158.serve.request import Delta, Event, Failed, Finished, Request, StepStats
from bitnet158.serve.runner import ModelRunner, Sampled
from bitnet158.serve.scheduler import Scheduler

log = logging.getLogger(__name__)

Emit = Callable[[list[tuple[Request, Event]], StepStats], None]


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, eos_ids: set[int], emit: Emit) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.eos_ids = eos_ids
        self.emit = emit
        self.in_flight: Sampled | None = None  # with `runner.overlaps`: the step the GPU runs, handled next step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bitnet158-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.scheduler.wake()
        self._thread.join()

    def submit(self, request: Request) -> None:
        self.scheduler.submit(request)

    def cancel(self, request: Request) -> None:
        """The client went away: free the request's slot at the next step boundary (nothing, if it has finished)."""
        request.cancelled = True
        self.scheduler.wake()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.scheduler.wait_for_work(timeout=0.5)
            try:
                self.step()
            except Exception:  # a bug must not leave clients waiting forever: fail everything running
                log.exception("engine step failed")
                self.in_flight = None
                events: list[tuple[Request, Event]] = []
                for request in self.scheduler.all_running():
                    events.append((request, Failed("internal error in the engine")))
                    self._retire(request)
                self._report(events)

    def step(self) -> None:
        dropped = self.scheduler.drop_cancelled()
        for request in dropped:
            request.done = True
            if request.slot is not None:
                self.runner.release(request.slot)
        decoding = self.scheduler.decoding()
        prompts = self.scheduler.admit(self.runner.prompt_chunk)
        launched = self.runner.sample(*self.runner.step(prompts, decoding)) if prompts or decoding else None
        if self.runner.overlaps:  # handle the previous step's tokens while the GPU runs this one
            launched, self.in_flight = self.in_flight, launched
        events, handled = self._advance(launched) if launched is not None else ([], 0)
        if dropped or prompts or decoding or events:
            self._report(events, sum(len(chunk) for _, chunk in prompts), handled)

    def _advance(self, step: Sampled) -> tuple[list[tuple[Request, Event]], int]:
        """Take each request's token, make its text, and retire the request if it is done: the events, and the
        number of tokens handled."""
        events: list[tuple[Request, Event]] = []
        handled = 0
        for request, (token, logprob) in zip(step.requests, step.results(), strict=True):
            if request.done:  # ended (or was cancelled) at the step before: this row was wasted
                continue
            handled += 1
            request.generated += 1
            if token in self.eos_ids:
                events.append((request, Delta(request.detokenizer.finish(), logprob)))
                self._finish(request, "stop", events)
                continue
            events.append((request, Delta(request.detokenizer.push(token), logprob)))
            if request.detokenizer.finished:  # a stop string
                self._finish(request, "stop", events)
            elif request.generated >= request.params.max_new_tokens:  # the API keeps prompt + max_tokens in context
                events.append((request, Delta(request.detokenizer.finish(), None)))
                self._finish(request, "length", events)
        return events, handled

    def _finish(self, request: Request, reason: str, events: list[tuple[Request, Event]]) -> None:
        events.append((request, Finished(reason, len(request.prompt_ids), request.generated)))
        self._retire(request)

    def _retire(self, request: Request) -> None:
        request.done = True
        self.scheduler.retire(request)
        self.runner.release(request.slot)

    def _report(self, events: list[tuple[Request, Event]], prompt_tokens: int = 0, generated_tokens: int = 0) -> None:
        running, waiting = self.scheduler.counts()
        self.emit(events, StepStats(running, waiting, self.runner.cache_usage(), prompt_tokens, generated_tokens))
