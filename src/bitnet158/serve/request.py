"""One generation request as the engine sees it, and the events it sends back to the HTTP handler."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import torch

from bitnet158.generation.detokenize import StreamingDetokenizer
from bitnet158.generation.sampling import SamplingParams


@dataclass
class TokenLogprob:
    """The chosen token's log-probability under the model, and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Delta:
    """What one step added: text (possibly empty, while held back for a stop string) and the token."""

    text: str
    logprob: TokenLogprob | None


@dataclass
class Finished:
    reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens or the context is full)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


Event = Delta | Finished | Failed


@dataclass(eq=False)  # compared by identity: the scheduler looks requests up in its lists
class Request:
    """Created by the HTTP handler on the event loop, then owned by the engine thread until finished.

    The engine hands events to `events` through `loop.call_soon_threadsafe`, so the handler awaits them
    without polling. `cancelled` is the only field the handler writes after submission.
    """

    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: StreamingDetokenizer
    loop: asyncio.AbstractEventLoop
    top_logprobs: int | None = None  # None: no logprobs; n: the chosen token's and the n most likely
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    generator: torch.Generator | None = None
    slot: int | None = None
    prompt_done: int = 0  # prompt tokens handed to the model: in the slot's cache, or in the current step
    sampled: int = 0  # tokens drawn, on the device: one step ahead of `generated` while the host lags behind
    generated: int = 0  # tokens the engine has handled (sent)
    cancelled: bool = False
    done: bool = False  # finished or dropped: the engine discards its tokens still on their way
    arrived: float = field(default_factory=time.monotonic)

    def send(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def send_all(events: list[tuple[Request, Event]]) -> None:
    """`request.send(event)` for each pair, with one wake-up of each event loop rather than one per event:
    a decode step hands every running request its token at once. Each request's events keep their order."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}
    for request, event in events:
        by_loop.setdefault(request.loop, []).append((request.events, event))
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)
