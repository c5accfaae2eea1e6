"""Runs the model for the engine: feed prompt chunks and decoding requests' last tokens into their cache
slots, and pick each row's next token with that row's own sampling parameters.

Three ways to run a step, by device:
- CUDA: one graph-captured decode step (`SlotDecoder`) with one row per request (rows must be in different
  slots): a decoding request's last sampled token, or the next token of a prompt. A prompt of at most
  `LONG_PROMPT` tokens goes one token per step; a longer one goes whole, all but its last token in one
  prefill pass (`SlotDecoder.prefill`), one request per call;
- the native CPU decoder: one call with a row per token, prompt chunks of any length beside decoding rows;
- elsewhere the model's forward: whole prompts in one right-padded batch, then the decoding rows.
On CUDA and the native CPU path a row's numbers depend only on its own slot, so a request gets exactly the
tokens it gets alone, whatever runs beside it (on CUDA a long prompt is always prefilled alone, and whole).

`sample` draws the tokens on the model's device and leaves them there, where the next step's decoding rows
read them, while a copy goes to the host behind the device's work. On CUDA nothing in `step` and `sample`
waits for the GPU, so the engine launches the next step before it handles this one's tokens (`overlaps`):
the host's work on them runs while the GPU computes.
"""

from __future__ import annotations

import torch

from bitnet158.generation.sampling import make_generator, next_token
from bitnet158.kernels import cpu_decode, gpu_kernels_available
from bitnet158.model import BitNetForCausalLM
from bitnet158.model.slot_cache import SlotCache
from bitnet158.serve.request import Request, TokenLogprob

# On CUDA, prompts of more tokens are prefilled in one pass: a graph row per prompt token costs a step little,
# but the prompt waits a step per token; the pass takes any length at once, but no step runs meanwhile (on the
# H200, 2B4T: 4.2 ms for 64 tokens, 13.0 ms for 1,000, against about 2 ms per step).
LONG_PROMPT = 64


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
            self.native = cpu_decode.applies(model, self.cache)
        # Whether the engine handles a step's tokens while the next step runs. Elsewhere than on CUDA the step
        # has run by the time `step` returns, so handling its tokens at once gives them to the clients sooner.
        self.overlaps = graph
        # The last step's sampled tokens (on the device) and each of its requests' row among them: what its
        # decoding requests feed next.
        self.sampled = torch.zeros(0, dtype=torch.long, device=model.device)
        self.rows: dict[Request, int] = {}

    def prompt_chunk(self, length: int) -> int | None:
        """The most tokens of a `length`-token prompt that one step takes; None: the whole prompt at once (the
        PyTorch path and CUDA's prefill pass take it in one piece, since cutting it would change its rounding)."""
        if self.decoder is not None:
            return None if length > LONG_PROMPT else 1
        return self.context if self.native else None

    @torch.inference_mode()
    def step(
        self, prompts: list[tuple[Request, list[int]]], decoding: list[Request]
    ) -> tuple[list[Request], torch.Tensor]:
        """Write each prompt chunk into its request's slot and feed each decoding request the token the last
        step sampled for it; the requests that now have next-token logits (decoding ones, and those whose prompt
        is complete) and those logits, `[len(ready), vocab]`. On CUDA the step is launched, not waited for."""
        for request, chunk in prompts:
            if request.prompt_done == len(chunk):  # the prompt's first chunk: the slot starts empty
                self.cache.release(request.slot)
        # Chunks in the middle of a prompt first, so that the rows with logits are the last ones: a slice, which
        # on the GPU needs no index from the host.
        prompts = sorted(prompts, key=lambda item: item[0].prompt_done == len(item[0].prompt_ids))
        requests = [request for request, _ in prompts] + decoding
        previous = [self.rows[request] for request in decoding]
        if self.decoder is not None:
            for request, chunk in prompts:
                if len(chunk) > 1:  # a long prompt, whole
                    self.decoder.prefill(request.slot, chunk[:-1])
            tokens = [chunk[-1] for _, chunk in prompts] + [0] * len(decoding)
            logits = self.decoder.step([r.slot for r in requests], tokens, [-1] * len(prompts) + previous,
                                       self.sampled)
        else:
            sampled = self.sampled.tolist()
            last = [sampled[row] for row in previous]
            if self.native:
                tokens = [chunk for _, chunk in prompts] + [[token] for token in last]
                logits = cpu_decode.forward_slots(self.model, self.cache, [r.slot for r in requests], tokens)
            else:
                parts = [self._prefill(prompts)] if prompts else []
                logits = torch.cat(parts + ([self._decode(decoding, last)] if decoding else []))
        waiting = sum(request.prompt_done < len(request.prompt_ids) for request in requests)
        return requests[waiting:], logits[waiting:]

    @torch.inference_mode()
    def sample(self, requests: list[Request], logits: torch.Tensor) -> Sampled:
        """Draw each request's next token from its row of `logits`, with its own parameters and generator, on the
        logits' device and without waiting for it; the next step's decoding rows read the tokens there. Starts
        the copy of the tokens (and logprobs, where asked) to the host."""
        # Greedy rows (argmax, what `next_token` does at temperature 0) in one op over all rows: they need no
        # generator. The other rows' draws replace theirs.
        tokens = _argmax(logits)
        for i, request in enumerate(requests):
            if request.params.temperature != 0 or request.params.repetition_penalty != 1:
                if request.generator is None:
                    request.generator = make_generator(request.params.seed, logits.device)
                tokens[i : i + 1] = next_token(logits[i : i + 1], request.params, request.generator)
            request.sampled += 1
        logprobs = [None if request.top_logprobs is None else
                    _logprobs(logits[i], tokens[i : i + 1], request.top_logprobs) for i, request in enumerate(requests)]
        self.sampled, self.rows = tokens, {request: i for i, request in enumerate(requests)}
        return Sampled(requests, tokens, logprobs)

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

    def _decode(self, requests: list[Request], tokens: list[int]) -> torch.Tensor:
        """The PyTorch path: feed `tokens[i]` into request i's slot; the next logits."""
        input_ids = torch.tensor([[token] for token in tokens], device=self.model.device)
        view = self.cache.batch([r.slot for r in requests], [1] * len(requests))
        return self.model(input_ids, view)[:, -1]

    def release(self, slot: int) -> None:
        self.cache.release(slot)

    def cache_usage(self) -> float:
        """Fraction of the requests' token positions that hold live keys and values."""
        return self.cache.tokens_held() / (self.num_slots * self.cache.max_length)


class Sampled:
    """One step's requests and the tokens (and logprobs) sampled for them, on their way to the host."""

    def __init__(
        self, requests: list[Request], tokens: torch.Tensor, logprobs: list[tuple[torch.Tensor, ...] | None]
    ) -> None:
        self.requests = requests
        # From the GPU into pinned host memory, queued behind the step's work without waiting for it; the event
        # marks the copies' end. On the CPU these are the tensors themselves.
        self.tokens = tokens.to("cpu", non_blocking=True)
        self.logprobs = [None if parts is None else [t.to("cpu", non_blocking=True) for t in parts]
                         for parts in logprobs]
        self.copied = None
        if tokens.device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(tokens.device))

    def results(self) -> list[tuple[int, TokenLogprob | None]]:
        """Each request's token and its logprobs if asked; waits for the copies."""
        if self.copied is not None:
            self.copied.synchronize()
        tokens = self.tokens.tolist()
        results: list[tuple[int, TokenLogprob | None]] = []
        for token, parts in zip(tokens, self.logprobs, strict=True):
            if parts is None:
                results.append((token, None))
                continue
            chosen, top_ids, top_values = parts
            top = list(zip(top_ids.tolist(), top_values.tolist(), strict=True))
            results.append((token, TokenLogprob(token, chosen.item(), top)))
        return results


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """The first largest logit of each row (the same tie rule as torch's argmax), on the logits' device."""
    rows = logits.float()
    if rows.device.type == "cpu":
        # numpy's argmax needs no thread pool, and is about 15x faster than torch's for 32 rows of 8192.
        return torch.from_numpy(rows.numpy().argmax(-1))
    return rows.argmax(-1)


def _logprobs(logits: torch.Tensor, token: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The log-probability of `token` (`[1]`) and the ids and log-probabilities of the `top` most likely tokens,
    under the model's own distribution (before temperature and filters, as OpenAI reports it), on the logits'
    device: indexing with a device tensor, not a host number, needs no wait."""
    logprobs = logits.float().log_softmax(-1)
    best = logprobs.topk(top)
    return logprobs.gather(0, token), best.indices, best.values
