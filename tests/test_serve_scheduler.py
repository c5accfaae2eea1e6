"""The serving scheduler's prompt budget (whole prompts, or chunks on the native CPU path and CUDA), and the
engine's promise that chunking and batching do not change a request's tokens."""

from __future__ import annotations

import pytest
import torch

from bitnet158.cli.model_loading import load_model
from bitnet158.generation.sampling import SamplingParams
from bitnet158.serve.request import Request
from bitnet158.serve.runner import ModelRunner, sample
from bitnet158.serve.scheduler import Scheduler


def _request(prompt_ids: list[int], max_new_tokens: int = 4) -> Request:
    # The scheduler and the runner use neither the detokenizer nor the event loop.
    return Request(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0), None, None)


def _chunks(work: list[tuple[Request, list[int]]]) -> list[tuple[int, list[int]]]:
    return [(request.slot, chunk) for request, chunk in work]


def test_whole_prompts_within_the_budget_and_at_least_one():
    scheduler = Scheduler(max_batch=4, max_queue=8, max_prefill_tokens=10)
    first, second, third, huge = _request([1] * 6), _request([2] * 6), _request([3] * 3), _request([4] * 15)
    for request in (first, second, third, huge):
        scheduler.submit(request)
    assert _chunks(scheduler.admit(None)) == [(0, [1] * 6)]  # the second does not fit beside it
    assert _chunks(scheduler.admit(None)) == [(1, [2] * 6), (2, [3] * 3)]
    assert _chunks(scheduler.admit(None)) == [(3, [4] * 15)]  # alone, past the budget
    assert scheduler.decoding() == []  # nothing sampled yet
    first.generated = 1
    assert scheduler.decoding() == [first]


def test_chunked_prompts_share_the_budget_oldest_first():
    scheduler = Scheduler(max_batch=2, max_queue=8, max_prefill_tokens=4)
    first, second, third = _request([1, 2, 3, 4, 5, 6]), _request([7, 8, 9]), _request([10])
    for request in (first, second, third):
        scheduler.submit(request)
    assert _chunks(scheduler.admit(100)) == [(0, [1, 2, 3, 4])]
    assert _chunks(scheduler.admit(100)) == [(0, [5, 6]), (1, [7, 8])]
    assert _chunks(scheduler.admit(100)) == [(1, [9])]
    assert scheduler.admit(100) == [] and scheduler.counts() == (2, 1)  # no free slot for the third
    scheduler.retire(first)
    assert _chunks(scheduler.admit(100)) == [(0, [10])]


def test_one_token_per_prompt_and_step():
    """The CUDA graph step takes one token of each prompt per step; the budget still bounds the step."""
    scheduler = Scheduler(max_batch=4, max_queue=8, max_prefill_tokens=2)
    first, second, third = _request([1, 2, 3]), _request([4, 5]), _request([6])
    for request in (first, second, third):
        scheduler.submit(request)
    assert _chunks(scheduler.admit(1)) == [(0, [1]), (1, [4])]
    assert _chunks(scheduler.admit(1)) == [(0, [2]), (1, [5])]
    assert _chunks(scheduler.admit(1)) == [(0, [3]), (2, [6])]
    assert scheduler.admit(1) == []


def _serve(
    model, arrivals: dict[int, list[list[int]]], budget: int, slots: int = 4
) -> list[tuple[list[int], torch.Tensor]]:
    """Run the scheduler and runner as the engine does (arrivals: step -> prompts); each request's 6 tokens
    and their logits."""
    runner = ModelRunner(model, slots)
    scheduler = Scheduler(max_batch=slots, max_queue=64, max_prefill_tokens=budget)
    requests, results = [], {}
    for step in range(max(arrivals) + 1000):
        for prompt in arrivals.get(step, []):
            requests.append(_request(prompt, max_new_tokens=6))
            scheduler.submit(requests[-1])
        decoding = scheduler.decoding()
        prompts = scheduler.admit(runner.prompt_chunk)
        if not prompts and not decoding:
            if step >= max(arrivals):
                break
            continue
        ready, logits = runner.step(prompts, decoding)
        for request, row, (token, _) in zip(ready, logits, sample(logits, ready), strict=True):
            request.generated, request.last_token = request.generated + 1, token
            results.setdefault(id(request), ([], []))[0].append(token)
            results[id(request)][1].append(row.clone())
            if request.generated == request.params.max_new_tokens:
                scheduler.retire(request)
                runner.release(request.slot)
    return [(results[id(r)][0], torch.stack(results[id(r)][1])) for r in requests]


@pytest.fixture(scope="module")
def embedded():
    return load_model(None, torch.device("cpu"))


@torch.inference_mode()
def test_chunked_batched_requests_get_their_lone_tokens(embedded):
    """Requests arriving at different steps, their prompts cut into chunks of at most 3 tokens beside other
    requests' chunks and decoding, get exactly the tokens and logits they get alone with whole prompts."""
    model, tokenizer = embedded
    prompts = [tokenizer.encode(text) for text in ("import os\n", "class Stack:\n    def", "def main():", "# C")]
    assert ModelRunner(model, 1).prompt_chunk == model.config.max_position_embeddings
    alone = [_serve(model, {0: [prompt]}, budget=512)[0] for prompt in prompts]
    together = _serve(model, {0: prompts[:2], 2: prompts[2:3], 3: prompts[3:]}, budget=3)
    for (tokens, logits), (lone_tokens, lone_logits) in zip(together, alone, strict=True):
        assert tokens == lone_tokens
        assert torch.equal(logits, lone_logits)


@torch.inference_mode()
def test_pytorch_path_prefills_whole_prompts(embedded, monkeypatch):
    """Without the native decoder (here switched off) prompts are prefilled whole through the model's forward,
    several in one right-padded batch, and decode beside each other: each request gets its lone tokens."""
    monkeypatch.setenv("BITNET158_CPU_KERNELS", "0")
    model, tokenizer = embedded
    prompts = [tokenizer.encode(text) for text in ("import os\n", "class Stack:\n    def", "# C")]
    assert ModelRunner(model, 1).prompt_chunk is None
    alone = [_serve(model, {0: [prompt]}, budget=512)[0][0] for prompt in prompts]
    together = _serve(model, {0: prompts[:2], 2: prompts[2:]}, budget=512)
    assert [tokens for tokens, _ in together] == alone
