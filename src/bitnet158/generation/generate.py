"""Text generation with a KV cache: prefill the left-padded prompts in one forward pass, then decode
one token per step for every row, until each row has hit EOS or a stop string, or the length limit."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from bitnet158.errors import UserError
from bitnet158.generation.detokenize import StreamingDetokenizer
from bitnet158.generation.sampling import SamplingParams, make_generator, next_token
from bitnet158.kernels import gpu_kernels_available
from bitnet158.model import BitNetForCausalLM, KVCache
from bitnet158.tokenizer import Tokenizer

PREFILL_MIN_LENGTH = 16  # the shortest prompt length on the GPU, after padding


@torch.inference_mode()
def generate_tokens(
    model: BitNetForCausalLM, prompt_ids: list[list[int]], params: SamplingParams
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, `[batch]`, one step at a time.

    Yields `params.max_new_tokens` steps, fewer if the model's context (`max_position_embeddings`)
    fills up first; a prompt longer than the context is a `UserError`. EOS and stop strings are the
    caller's business: it stops iterating when it is done.
    """
    if not prompt_ids:
        raise UserError("no prompts to generate from")
    for row, ids in enumerate(prompt_ids):
        if not ids:
            raise UserError(f"prompt {row} is empty")
        if max(ids) >= model.config.vocab_size:
            raise UserError(f"prompt {row} has token id {max(ids)}, outside the model's vocabulary of "
                            f"{model.config.vocab_size} (is the tokenizer the model's?)")
    longest = max(len(ids) for ids in prompt_ids)
    context = model.config.max_position_embeddings
    if longest > context:
        raise UserError(f"the prompt is {longest} tokens, longer than the model's context of {context}")
    # The last token is sampled but never fed back, so it needs no cache slot.
    steps = min(params.max_new_tokens, context - longest + 1)
    batch, device = len(prompt_ids), model.device
    padding = torch.tensor([longest - len(ids) for ids in prompt_ids])
    # Pad with token 0: pad slots are masked out of attention, so their value does not matter.
    input_ids = torch.tensor([[0] * (longest - len(ids)) + ids for ids in prompt_ids], device=device)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=device)
        for row, ids in enumerate(prompt_ids):
            seen[row, ids] = True
    generator = make_generator(params.seed, device)
    if device.type == "cuda" and gpu_kernels_available():
        yield from _generate_tokens_gpu(model, input_ids, padding, params, generator, seen, steps)
        return

    cache = KVCache(model.config, batch, longest + steps - 1, device, model.dtype)
    cache.set_padding(padding)
    logits = model(input_ids, cache)[:, -1]
    for step in range(steps):
        tokens = next_token(logits, params, generator, seen)
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        yield tokens
        if step + 1 < steps:
            logits = model(tokens[:, None], cache)[:, -1]


def _decoder(model: BitNetForCausalLM, batch: int, max_length: int):
    """The model's `GPUDecoder` for this batch size, reused (with its captured graph) while its cache is long enough."""
    from bitnet158.generation.gpu_decode import GPUDecoder

    decoder = getattr(model, "_gpu_decoder", None)
    if decoder is None or decoder.batch != batch or decoder.cache.max_length < max_length:
        model._gpu_decoder = None  # free the old cache first
        # Whole multiples of 256 slots, so that slightly longer requests reuse the graph.
        decoder = GPUDecoder(model, batch, min(-(-max_length // 256) * 256, model.config.max_position_embeddings))
        model._gpu_decoder = decoder
    return decoder


def _generate_tokens_gpu(
    model: BitNetForCausalLM,
    input_ids: torch.Tensor,
    padding: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    seen: torch.Tensor | None,
    steps: int,
) -> Iterator[torch.Tensor]:
    """`generate_tokens` on a CUDA device: the graph-captured decode step of `GPUDecoder`.

    Each step's tokens are copied to the host right after sampling and the next step is queued
    before the host waits for them, so the GPU never idles while the caller handles text."""
    batch, longest = input_ids.shape
    # More left padding, to a power of two (at least 16) where the context allows: then a few prefill graphs
    # serve every prompt length. Pad positions are masked out of attention, as the prompts' own padding is.
    length = max(PREFILL_MIN_LENGTH, 1 << (longest - 1).bit_length())
    if length + steps - 1 <= model.config.max_position_embeddings:
        input_ids = F.pad(input_ids, (length - longest, 0))
        padding = padding + (length - longest)
        longest = length
    decoder = _decoder(model, batch, longest + steps - 1)
    decoder.reset(padding)
    host = torch.empty(batch, dtype=torch.long, pin_memory=True)
    copied = torch.cuda.Event()

    tokens = next_token(decoder.prefill(input_ids), params, generator, seen)
    for step in range(steps):
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        host.copy_(tokens, non_blocking=True)
        copied.record()
        if step + 1 < steps:
            tokens = next_token(decoder.decode(tokens), params, generator, seen)
        copied.synchronize()
        yield host.clone()


def _generate_pieces(
    model: BitNetForCausalLM, tokenizer: Tokenizer, prompts: list[str], params: SamplingParams, add_bos: bool
) -> Iterator[list[str]]:
    """Yield, at each step, the new text of every row ("" for rows held back or finished)."""
    prompt_ids = [tokenizer.encode(prompt, add_bos=add_bos) for prompt in prompts]
    eos_ids = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    rows = [StreamingDetokenizer(tokenizer, ids, params.stop) for ids in prompt_ids]
    for tokens in generate_tokens(model, prompt_ids, params):
        yield [
            row.finish() if token in eos_ids else row.push(token)
            for row, token in zip(rows, tokens.tolist(), strict=True)
        ]
        if all(row.finished for row in rows):
            return
    yield [row.finish() for row in rows]


def generate(
    model: BitNetForCausalLM, tokenizer: Tokenizer, prompts: list[str], params: SamplingParams, add_bos: bool = True
) -> list[str]:
    """The continuation of each prompt (without the prompt, the stop string or EOS), generated as one batch.

    A row ends at EOS (the model config's or the tokenizer's) or a stop string; all end after
    `params.max_new_tokens` or when the model's context is full. `add_bos` puts the tokenizer's BOS
    token before each prompt (never twice, see `Tokenizer.encode`).
    """
    texts: list[list[str]] = [[] for _ in prompts]
    for pieces in _generate_pieces(model, tokenizer, prompts, params, add_bos):
        for text, piece in zip(texts, pieces, strict=True):
            text.append(piece)
    return ["".join(text) for text in texts]


def stream(
    model: BitNetForCausalLM, tokenizer: Tokenizer, prompt: str, params: SamplingParams, add_bos: bool = True
) -> Iterator[str]:
    """Yield the continuation of `prompt` in pieces as it is generated; together they are
    `generate(model, tokenizer, [prompt], params)[0]`."""
    for pieces in _generate_pieces(model, tokenizer, [prompt], params, add_bos):
        if pieces[0]:
            yield pieces[0]
