"""The engine runs in a process of its own; the HTTP side talks to it through a pipe.

Both sides are Python. In one process, the HTTP side's work on a burst of arrivals (FastAPI, validation,
tokenizing, the ends of the old streams) held the interpreter lock while the engine thread waited to launch its
next step: on the H200 with 32 clients, whose requests end and arrive together, about 1% of the steps came
23-36 ms late. In its own process the engine has an interpreter to itself.

The API process (`EngineProcess`) sends `("submit", id, prompt_ids, params, top_logprobs)` and `("cancel", id)`;
the engine process (`run_engine`) answers each step with `("events", [(id, event), ...], stats)`. The API process
reads the pipe on its event loop, so an event goes straight into its request's queue. It keeps the metrics:
time to first token and latency by its own clock, the rest from the engine's stats. It also bounds the requests
in flight (`max_batch` running and `max_queue` waiting), so that a full queue is a 429 without a round trip.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from bitnet158.cli.model_loading import load_model
from bitnet158.devices import resolve_device
from bitnet158.errors import UserError
from bitnet158.generation.detokenize import StreamingDetokenizer
from bitnet158.generation.sampling import SamplingParams
from bitnet158.kernels import cpu
from bitnet158.serve.engine import Engine
from bitnet158.serve.metrics import Metrics
from bitnet158.serve.request import Delta, Event, Failed, Finished, Request, StepStats
from bitnet158.serve.runner import ModelRunner
from bitnet158.serve.scheduler import Scheduler

log = logging.getLogger(__name__)

# Prompt tokens per step, so that arrivals do not stall the running requests for long. Whole prompts
# (the PyTorch path, CUDA's long ones) are prefilled between two decode steps, at least one per step: a few
# prompts' worth.
# The native CPU path cuts prompts into chunks that share a step with every decoding request: a 901-token
# prompt beside 8 streams stretches their gaps to 160 ms with 512 per step, to 64 ms with 128 (and its
# own first token comes 15% later).
MAX_PREFILL_TOKENS = 512
MAX_CHUNKED_PREFILL_TOKENS = 128


@dataclass(frozen=True)
class ModelSource:
    """What the engine process loads: a model folder or .gguf file (None: the embedded model) on `device`
    (auto, cpu, cuda, cuda:N or mps), with `threads` CPU threads for the kernels (None: $BITNET158_THREADS, else
    every CPU the process may use but one)."""

    path: Path | None
    device: str = "auto"
    threads: int | None = None


class QueueFull(Exception):
    """`max_batch + max_queue` requests are in flight: the server answers 429."""


class EngineStopped(Exception):
    """The engine process has exited: nothing more can be generated."""


@dataclass(eq=False)
class RequestHandle:
    """The API process's side of a request: its events as they arrive, and when it arrived."""

    top_logprobs: int | None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.monotonic)
    started: bool = False  # its first token has arrived


class EngineProcess:
    """The API process's handle on the engine process: `start` it (which loads the model there), `attach` it to
    the server's event loop, `submit` and `cancel` requests, `stop` it."""

    def __init__(self, source: ModelSource, max_batch: int, max_queue: int, metrics: Metrics) -> None:
        self.source = source
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self.context = 0  # the model's context length, once started
        self.handles: dict[str, RequestHandle] = {}  # requests in flight
        self.running = False
        self._process: multiprocessing.Process | None = None
        self._pipe: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start the engine process and wait until it has loaded the model; a `UserError` with the engine's
        message if it cannot."""
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._pipe, theirs = context.Pipe()
        self._process = context.Process(target=run_engine, args=(theirs, self.source, self.max_batch),
                                        name="bitnet158-engine", daemon=True)
        self._process.start()
        theirs.close()
        try:
            kind, value = self._pipe.recv()
        except EOFError:  # it died without a word: killed, or a crash in native code
            kind, value = "error", None
        if kind == "error":
            self._process.join()
            self._pipe.close()
            raise UserError(value or f"the engine process exited (code {self._process.exitcode}) loading the model")
        self.context = value
        self.running = True

    @property
    def pid(self) -> int:
        return self._process.pid

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the engine's events on `loop`, the server's."""
        self._loop = loop
        loop.add_reader(self._pipe.fileno(), self._receive)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._pipe.fileno())
            self._loop = None
        if self.running:
            self.running = False
            try:
                self._pipe.send(("stop",))
            except OSError:  # it has exited already
                pass
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
        self._pipe.close()

    def submit(self, prompt_ids: list[int], params: SamplingParams, top_logprobs: int | None) -> RequestHandle:
        """Hand a request to the engine; `QueueFull` when `max_batch + max_queue` are in flight."""
        if not self.running:
            raise EngineStopped
        if len(self.handles) >= self.max_batch + self.max_queue:
            raise QueueFull
        handle = RequestHandle(top_logprobs)
        try:
            self._pipe.send(("submit", handle.id, prompt_ids, params, top_logprobs))
        except OSError:  # it has just exited: the pipe's end is seen on the loop soon
            raise EngineStopped from None
        self.handles[handle.id] = handle
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """The client went away: the engine frees the request's slot at its next step (nothing, if it has finished)."""
        if self.handles.pop(handle.id, None) is not None and self.running:
            try:
                self._pipe.send(("cancel", handle.id))
            except OSError:  # it has just exited
                pass

    def _receive(self) -> None:
        """One message from the engine (the loop calls again while the pipe has more)."""
        try:
            _, events, stats = self._pipe.recv()
        except (EOFError, OSError):
            self._engine_exited()
            return
        now = time.monotonic()
        for request_id, event in events:
            handle = self.handles.get(request_id)
            if handle is None:  # cancelled
                continue
            if isinstance(event, Delta) and not handle.started:
                handle.started = True
                self.metrics.time_to_first_token.observe(now - handle.arrived)
            elif isinstance(event, Finished):
                self.metrics.latency.observe(now - handle.arrived)
            if not isinstance(event, Delta):
                del self.handles[request_id]
            handle.events.put_nowait(event)
        self._count(stats)

    def _count(self, stats: StepStats) -> None:
        self.metrics.running.set(stats.running)
        self.metrics.waiting.set(stats.waiting)
        self.metrics.kv_cache_usage.set(stats.kv_cache_usage)
        self.metrics.prompt_tokens.inc(stats.prompt_tokens)
        self.metrics.generated_tokens.inc(stats.generated_tokens)

    def _engine_exited(self) -> None:
        log.error("the engine process exited (code %s)", self._process.exitcode)
        self._loop.remove_reader(self._pipe.fileno())
        self._loop = None
        self.running = False
        for handle in self.handles.values():
            handle.events.put_nowait(Failed("the engine process exited"))
        self.handles.clear()


def run_engine(pipe: Connection, source: ModelSource, max_batch: int) -> None:
    """The engine process: load the model, answer ("ready", context length) or ("error", message), then run the
    engine on what the pipe brings until told to stop or the API process goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the API process stops us
    try:
        threads = source.threads
        if threads is None and "BITNET158_THREADS" not in os.environ:
            # One CPU for the HTTP process: where it preempts a kernel thread, the whole step waits for that thread
            # (on 2 cores, 32 clients: 2,192 tokens/s with one kernel thread, 1,841-1,976 with two).
            threads = max(1, cpu.default_threads() - 1)
        cpu.configure_threads(threads)
        model, tokenizer = load_model(source.path, resolve_device(source.device))
        runner = ModelRunner(model, max_batch)
    except UserError as error:
        pipe.send(("error", str(error)))
        return
    except Exception as error:  # a bug, or the device failing: the traceback to stderr, one line to the server
        log.exception("the engine could not start")
        pipe.send(("error", f"the engine could not start: {type(error).__name__}: {error}"))
        return
    eos_ids = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    live: dict[str, Request] = {}

    def emit(events: list[tuple[Request, Event]], stats: StepStats) -> None:
        for request, event in events:
            if not isinstance(event, Delta):
                live.pop(request.id, None)
        pipe.send(("events", [(request.id, event) for request, event in events], stats))

    budget = MAX_CHUNKED_PREFILL_TOKENS if runner.native else MAX_PREFILL_TOKENS
    engine = Engine(runner, Scheduler(max_batch, budget), eos_ids, emit)
    # The model lives as long as the process: keep it out of the garbage collector's full passes, which then take
    # about 1 ms instead of 100 (and the step waits).
    gc.freeze()
    pipe.send(("ready", model.config.max_position_embeddings))
    engine.start()
    try:
        while True:
            message = pipe.recv()
            if message[0] == "submit":
                _, request_id, prompt_ids, params, top_logprobs = message
                detokenizer = StreamingDetokenizer(tokenizer, prompt_ids, params.stop)
                live[request_id] = Request(prompt_ids, params, detokenizer, top_logprobs, request_id)
                engine.submit(live[request_id])
            elif message[0] == "cancel":
                request = live.pop(message[1], None)
                if request is not None:
                    engine.cancel(request)
            else:
                break
    except EOFError:  # the API process has gone
        pass
    finally:
        engine.stop()
