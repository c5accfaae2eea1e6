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
    last_token: int | None = None
    generated: int = 0
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)

    def send(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)
