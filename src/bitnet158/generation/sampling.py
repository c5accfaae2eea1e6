"""Choosing the next token from logits `[batch, vocab]`: small pure functions, applied in the order of
transformers' logits processors (repetition penalty, temperature, top-k, top-p, min-p), then a draw."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from bitnet158.errors import UserError


@dataclass
class SamplingParams:
    """How to generate. `temperature=0` is greedy decoding; `top_k=0`, `top_p=1`, `min_p=0` and
    `repetition_penalty=1` switch those off. `seed=None` draws a fresh random seed."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_int("top_k", self.top_k, minimum=0)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        _check_number("temperature", self.temperature, ">= 0", lambda v: v >= 0)
        _check_number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        _check_number("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        _check_number("repetition_penalty", self.repetition_penalty, "> 0", lambda v: v > 0)
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise UserError(f"stop must be a list of non-empty strings, got {self.stop!r}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: object, rule: str, ok) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not ok(value):
        raise UserError(f"{name} must be a number {rule}, got {value!r}")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty, as in transformers: for tokens already in the sequence (`seen`, bool `[batch, vocab]`),
    divide positive logits by `penalty` and multiply negative ones, so both become less likely."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Flatten (> 1) or sharpen (< 1) the distribution; greedy decoding handles temperature 0."""
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` largest logits of each row (and any tied with the k-th); 0 keeps all."""
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k).values[:, -1:]
    return logits.masked_fill(logits < kth_largest, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches `p`, at least one."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False  # the most likely token stays, even where p underflows float32 to 0
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least `min_p` times that of the most likely token."""
    if min_p == 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, -math.inf)


def sample(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token id per row `[batch]`, drawn from softmax(logits).

    This is how `torch.multinomial(probs, 1)` draws (argmax of probs / Exp(1) noise, the same numbers from the
    generator, so seeded results are the same) without its checks of the probabilities, which wait for the
    GPU: the server samples a step's tokens while the GPU still computes them."""
    probs = logits.softmax(-1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)


def next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """The next token `[batch]` from the last position's logits `[batch, vocab]`.

    `seen` marks the tokens of each sequence so far; it is needed only for a repetition penalty.
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    return sample(logits, generator)
