"""One generation request as the engine sees it, and the events it sends back to the HTTP side."""

from __future__ import annotations

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


@dataclass
class StepStats:
    """What the engine reports with each step's events, for the server's metrics."""

    running: int
    waiting: int
    kv_cache_usage: float
    prompt_tokens: int = 0  # prompt tokens fed since the last report
    generated_tokens: int = 0  # tokens handled since the last report


@dataclass(eq=False)  # compared by identity: the scheduler looks requests up in its lists
class Request:
    """Owned by the engine thread from submission on; `cancelled` is the only field others write after it."""

    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: StreamingDetokenizer
    top_logprobs: int | None = None  # None: no logprobs; n: the chosen token's and the n most likely
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    generator: torch.Generator | None = None
    slot: int | None = None
    prompt_done: int = 0  # prompt tokens handed to the model: in the slot's cache, or in the current step
    sampled: int = 0  # tokens drawn, on the device: one step ahead of `generated` while the host lags behind
    generated: int = 0  # tokens the engine has handled (sent)
    cancelled: bool = False
    done: bool = False  # finished or dropped: the engine discards its tokens still on their way
