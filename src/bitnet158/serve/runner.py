"""Runs the model for the engine: feed prompt chunks and decoding requests' last tokens into their cache
slots, and pick each row's next token with that row's own sampling parameters.

Three ways to run a step, by device:
- CUDA: one graph-captured decode step (`SlotDecoder`) with one row per request, prompt tokens too, one
  per step (rows must be in different slots);
- the native CPU decoder: one call with a row per token, prompt chunks of any length beside decoding rows;
- elsewhere the model's forward: whole prompts in one right-padded batch, then the decoding rows.
On CUDA and the native CPU path a row's numbers depend only on its own slot, so a request gets exactly the
tokens it gets alone, whatever runs beside it.
"""

from __future__ import annotations

import torch

from bitnet158.generation.sampling import make_generator, next_token
from bitnet158.kernels import cpu_decode, gpu_kernels_available
from bitnet158.model import BitNetForCausalLM
from bitnet158.model.slot_cache import SlotCache
from bitnet158.serve.request import Request, TokenLogprob


class ModelRunner:
    def __init__(self, model: BitNetForCausalLM, num_slots: int) -> None:
        self.model = model
        self.context = model.config.max_position_embeddings
        self.num_slots = num_slots
        graph = model.device.type == "cuda" and gpu_kernels_available()
        # The graph step's padding rows write into a spare last slot.
        self.cache = SlotCache(model.config, num_slots + graph, self.context, model.device, model.dtype)
        self.decoder = None
        if graph:
            from bitnet158.generation.gpu_decode import SlotDecoder  # imports Triton

            self.decoder = SlotDecoder(model, self.cache, num_slots)
        with torch.inference_mode():
            native = cpu_decode.applies(model, self.cache)
        # The most tokens of one prompt a step takes (None: the whole prompt, which the PyTorch path
        # prefills in one piece, since cutting it would change its rounding).
        self.prompt_chunk = 1 if graph else self.context if native else None

    @torch.inference_mode()
    def step(
        self, prompts: list[tuple[Request, list[int]]], decoding: list[Request]
    ) -> tuple[list[Request], torch.Tensor]:
        """Write each prompt chunk into its request's slot and feed each decoding request its last token; the
        requests that now have next-token logits (decoding ones, and those whose prompt is complete) and
        those logits, `[len(ready), vocab]`."""
        for request, chunk in prompts:
            if request.prompt_done == len(chunk):  # the prompt's first chunk: the slot starts empty
                self.cache.release(request.slot)
        requests = [request for request, _ in prompts] + decoding
        if self.decoder is not None:
            tokens = [chunk[0] for _, chunk in prompts] + [r.last_token for r in decoding]
            logits = self.decoder.step([r.slot for r in requests], tokens)
        elif cpu_decode.applies(self.model, self.cache):
            tokens = [chunk for _, chunk in prompts] + [[r.last_token] for r in decoding]
            logits = cpu_decode.forward_slots(self.model, self.cache, [r.slot for r in requests], tokens)
        else:
            parts = ([self._prefill(prompts)] if prompts else []) + ([self._decode(decoding)] if decoding else [])
            logits = torch.cat(parts)
        ready = [i for i, request in enumerate(requests) if request.prompt_done == len(request.prompt_ids)]
        if len(ready) < len(requests):  # chunks in the middle of a prompt
            logits = logits[ready]
        return [requests[i] for i in ready], logits

    def _prefill(self, prompts: list[tuple[Request, list[int]]]) -> torch.Tensor:
        """The PyTorch path: append the chunks to their slots, right-padded in one batch; the logits after each."""
        lengths = [len(chunk) for _, chunk in prompts]
        width = max(lengths)
        # Right-padded: pad tokens land past each slot's end and are masked out of attention.
        input_ids = torch.tensor([chunk + [0] * (width - len(chunk)) for _, chunk in prompts])
        view = self.cache.batch([request.slot for request, _ in prompts], lengths)
        logits = self.model(input_ids.to(self.model.device), view)
        last = torch.tensor(lengths, device=logits.device) - 1
        return logits[torch.arange(len(prompts), device=logits.device), last]

    def _decode(self, requests: list[Request]) -> torch.Tensor:
        """The PyTorch path: feed each request's last token into its slot; the next logits."""
        input_ids = torch.tensor([[r.last_token] for r in requests], device=self.model.device)
        view = self.cache.batch([r.slot for r in requests], [1] * len(requests))
        return self.model(input_ids, view)[:, -1]

    def release(self, slot: int) -> None:
        self.cache.release(slot)

    def cache_usage(self) -> float:
        """Fraction of the requests' token positions that hold live keys and values."""
        return self.cache.tokens_held() / (self.num_slots * self.cache.max_length)


@torch.inference_mode()
def sample(logits: torch.Tensor, requests: list[Request]) -> list[tuple[int, TokenLogprob | None]]:
    """Each row's next token, drawn with its request's parameters and generator, and its logprobs if asked."""
    tokens: list[int | None] = [None] * len(requests)
    # Greedy rows (argmax, what `next_token` does at temperature 0) in one op: they need no generator.
    greedy = [i for i, r in enumerate(requests) if r.params.temperature == 0 and r.params.repetition_penalty == 1]
    if greedy:
        rows = (logits if len(greedy) == len(requests) else logits[greedy]).float()
        # On the CPU numpy's argmax (the first of equal maxima, like torch's): it needs no thread pool, and is
        # about 15x faster than torch's for 32 rows of 8192.
        picked = rows.numpy().argmax(-1) if rows.device.type == "cpu" else rows.argmax(-1)
        for i, token in zip(greedy, picked.tolist(), strict=True):
            tokens[i] = token
    chosen = []
    for i, request in enumerate(requests):
        if tokens[i] is None:
            if request.generator is None:
                request.generator = make_generator(request.params.seed, logits.device)
            tokens[i] = int(next_token(logits[i][None], request.params, request.generator)[0])
        logprob = None if request.top_logprobs is None else _logprob(logits[i], tokens[i], request.top_logprobs)
        chosen.append((tokens[i], logprob))
    return chosen


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    # The model's own distribution, before temperature and filters, as OpenAI reports it.
    logprobs = logits.float().log_softmax(-1)
    best = logprobs.topk(top) if top else None
    pairs = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), pairs)
