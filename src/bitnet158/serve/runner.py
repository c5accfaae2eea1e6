"""Runs the model for the engine: prefill prompts into cache slots, decode one token for a batch of
slots, and pick each row's next token with that row's own sampling parameters."""

from __future__ import annotations

import torch

from bitnet158.generation.sampling import make_generator, next_token
from bitnet158.model import BitNetForCausalLM
from bitnet158.model.slot_cache import SlotCache
from bitnet158.serve.request import Request, TokenLogprob


class ModelRunner:
    def __init__(self, model: BitNetForCausalLM, num_slots: int) -> None:
        self.model = model
        self.context = model.config.max_position_embeddings
        self.cache = SlotCache(model.config, num_slots, self.context, model.device, model.dtype)

    @torch.inference_mode()
    def prefill(self, requests: list[Request]) -> torch.Tensor:
        """Write each request's prompt into its (emptied) slot; the logits after each prompt, `[batch, vocab]`."""
        for request in requests:
            self.cache.release(request.slot)
        lengths = [len(r.prompt_ids) for r in requests]
        width = max(lengths)
        # Right-padded: pad tokens land past each slot's end and are masked out of attention.
        input_ids = torch.tensor([r.prompt_ids + [0] * (width - len(r.prompt_ids)) for r in requests])
        view = self.cache.batch([r.slot for r in requests], lengths)
        logits = self.model(input_ids.to(self.model.device), view)
        last = torch.tensor(lengths, device=logits.device) - 1
        return logits[torch.arange(len(requests), device=logits.device), last]

    @torch.inference_mode()
    def decode(self, requests: list[Request]) -> torch.Tensor:
        """Feed each request's last token into its slot; the next logits `[batch, vocab]`."""
        input_ids = torch.tensor([[r.last_token] for r in requests], device=self.model.device)
        view = self.cache.batch([r.slot for r in requests], [1] * len(requests))
        return self.model(input_ids, view)[:, -1]

    def release(self, slot: int) -> None:
        self.cache.release(slot)

    def cache_usage(self) -> float:
        """Fraction of the cache's token positions that hold live keys and values."""
        return self.cache.tokens_held() / (self.cache.num_slots * self.cache.max_length)


@torch.inference_mode()
def sample(logits: torch.Tensor, requests: list[Request]) -> list[tuple[int, TokenLogprob | None]]:
    """Each row's next token, drawn with its request's parameters and generator, and its logprobs if asked."""
    chosen = []
    for row, request in zip(logits, requests, strict=True):
        if request.generator is None:
            request.generator = make_generator(request.params.seed, logits.device)
        token = int(next_token(row[None], request.params, request.generator)[0])
        chosen.append((token, None if request.top_logprobs is None else _logprob(row, token, request.top_logprobs)))
    return chosen


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    # The model's own distribution, before temperature and filters, as OpenAI reports it.
    logprobs = logits.float().log_softmax(-1)
    best = logprobs.topk(top) if top else None
    pairs = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), pairs)
