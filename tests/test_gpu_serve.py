"""The server's CUDA path: graph-captured steps over the slot cache (`SlotDecoder`), one token per request and
step (short prompts too; long ones have all but their last token prefilled through the model's forward, one request
per call), each step launched before the host handles the previous one's tokens. Skipped without CUDA."""

from __future__ import annotations

import gc

import pytest
import torch
from test_serve_scheduler import _request, _serve, check_overlapped_engine

from bitnet158 import BitNetForCausalLM
from bitnet158.cli.model_loading import embedded_model_path
from bitnet158.generation.sampling import SamplingParams, make_generator, sample
from bitnet158.model.slot_cache import SlotCache
from bitnet158.serve.runner import LONG_PROMPT, ModelRunner
from bitnet158.serve.scheduler import Scheduler
from bitnet158.tokenizer import Tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TEXTS = [
    "import os\n", "class Stack:\n    def", "def main():", "# C", "from typing import",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\nclass Queue:\n    \"\"\"A first-in first-out queue.\"\"\"\n",
]


def _model(dtype: torch.dtype) -> tuple[BitNetForCausalLM, list[list[int]]]:
    model = BitNetForCausalLM.from_pretrained(embedded_model_path(), device="cuda", dtype=dtype)
    tokenizer = Tokenizer.from_pretrained(embedded_model_path())
    return model, [tokenizer.encode(text) for text in TEXTS]


@torch.inference_mode()
def test_graph_steps_match_the_model_forward():
    """Prompts of 2 to 80 tokens decoding together (the longest prefilled through the forward, the others a token
    per step): each request's logits are those of the model's ordinary forward over its prompt and tokens
    (float32), and so are its greedy tokens where the top two logits are apart.

    The graph step sums the norm in another order than torch's, so an activation code may move by one step and
    shift all later logits by a little (not float32 rounding)."""
    model, prompts = _model(torch.float32)
    runner = ModelRunner(model, 4)
    assert runner.prompt_chunk(LONG_PROMPT) == 1 and runner.prompt_chunk(LONG_PROMPT + 1) is None
    assert runner.decoder is not None
    assert max(len(p) for p in prompts) > LONG_PROMPT >= 64  # past the first split of the attention (64 positions)
    served = _serve(model, {0: prompts[:3], 2: prompts[3:]}, budget=512)
    for prompt, (tokens, logits) in zip(prompts, served, strict=True):
        ids = torch.tensor([prompt + tokens], device="cuda")
        expected = model(ids)[0, len(prompt) - 1 : -1]
        scale = expected.abs().max()
        diff = (logits - expected).abs().amax(-1)
        assert diff.max() < 3e-2 * scale
        top2 = expected.topk(2, dim=-1).values
        decisive = top2[:, 0] - top2[:, 1] > 2 * diff
        assert decisive.float().mean() >= 0.5
        assert torch.equal(logits.argmax(-1)[decisive], expected.argmax(-1)[decisive])


@torch.inference_mode()
def test_a_request_gets_its_lone_tokens_among_32_and_in_reused_slots():
    """40 requests over 32 slots, arriving at different steps (so the buckets change and finished requests'
    slots are reused, without clearing): each gets exactly the tokens and logits it gets alone (bf16, as served)."""
    model, prompts = _model(torch.bfloat16)
    requests = [prompts[i % len(prompts)][: 3 + i % 7] + [i] for i in range(40)]
    alone = _serve(model, {200 * i: [prompt] for i, prompt in enumerate(requests)}, budget=512, slots=32)
    together = _serve(model, {0: requests[:1], 1: requests[1:20], 4: requests[20:33], 9: requests[33:]},
                      budget=512, slots=32)
    assert len({tuple(tokens) for tokens, _ in alone}) > 20  # the requests differ
    for (tokens, logits), (lone_tokens, lone_logits) in zip(together, alone, strict=True):
        assert tokens == lone_tokens
        assert torch.equal(logits, lone_logits)


@torch.inference_mode()
@pytest.mark.parametrize("slots", [4, 32])
def test_overlapped_engine_gives_the_lone_tokens(slots: int):
    """The engine as it runs on CUDA, each step launched before the host has the previous step's tokens, gives
    the tokens of the synchronous engine running each request alone: with one request ending on EOS, one on a
    stop string, one cancelled (their wasted rows discarded, their slots reused with 4 slots), one seeded."""
    model = BitNetForCausalLM.from_pretrained(embedded_model_path(), device="cuda", dtype=torch.bfloat16)
    tokenizer = Tokenizer.from_pretrained(embedded_model_path())
    assert ModelRunner(model, 1).overlaps
    check_overlapped_engine(model, tokenizer, TEXTS, slots)


@torch.inference_mode()
def test_a_step_and_its_sampling_do_not_wait_for_the_gpu():
    """Launching a step, its prompts' prefill included, and sampling its tokens (greedy, seeded top-p, logprobs)
    never synchronises with the GPU, which is what lets the host work while the GPU computes; the tokens come back
    through pinned memory."""
    model, prompts = _model(torch.bfloat16)
    runner = ModelRunner(model, 4)
    scheduler = Scheduler(max_batch=4, max_prefill_tokens=128)
    requests = [_request(prompts[0][:2], 8), _request(prompts[1][:1], 8), _request(prompts[5], 8)]
    requests[1].params = SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    requests[2].top_logprobs = 2
    for request in requests:
        scheduler.submit(request)
    steps = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            decoding = scheduler.decoding()
            steps.append(runner.sample(*runner.step(scheduler.admit(runner.prompt_chunk), decoding)))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(prompts[5]) > LONG_PROMPT
    assert [len(step.requests) for step in steps] == [2, 3, 3, 3, 3]  # the long prompt whole, the others by token
    assert all(step.tokens.is_pinned() for step in steps)
    results = steps[-1].results()
    assert results[0][1] is None and results[1][1] is None
    top = results[2][1]
    assert top.token_id == results[2][0] and len(top.top) == 2 and top.top[0][1] == top.logprob  # greedy


@torch.inference_mode()
def test_a_prefill_graph_computes_what_the_eager_pass_computes():
    """A long prompt goes into its slot through the prefill graph of its bucket (72 tokens: 128, padded), which
    reads the slot and the tokens at replay: its keys and values are those of `prefill_layers` run eagerly on the
    padded prompt, bit for bit, even after other allocations that would take any memory the graph still read."""
    from bitnet158.generation.gpu_decode import prefill_layers  # imports Triton

    model, prompts = _model(torch.bfloat16)
    runner = ModelRunner(model, 3)
    prompt = prompts[5][:72]
    assert runner.decoder.prefill_buckets[:2] == [64, 128]
    clutter = [torch.full((16,), 10**6, dtype=torch.long, device="cuda") for _ in range(1000)]  # noqa: F841
    runner.decoder.prefill(1, prompt)
    assert runner.cache.lengths[1] == 72
    eager = SlotCache(model.config, 1, runner.cache.max_length, "cuda", torch.bfloat16)
    prefill_layers(model, torch.tensor([prompt + [0] * 56], device="cuda"), eager.batch([0], [128]))
    assert torch.equal(runner.cache.keys[:, 1, :, :72], eager.keys[:, 0, :, :72])
    assert torch.equal(runner.cache.values[:, 1, :, :72], eager.values[:, 0, :, :72])
    assert runner.cache.keys[:, 1].abs().sum() > 0 and not runner.cache.keys[:, 0].any()  # slot 1, not another


def test_sampling_draws_what_multinomial_draws_on_the_gpu():
    logits = torch.randn(3, 32000, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 4
    for seed in range(20):
        ours, theirs = make_generator(seed, logits.device), make_generator(seed, logits.device)
        assert torch.equal(sample(logits, ours), torch.multinomial(logits.softmax(-1), 1, generator=theirs)[:, 0])
        assert torch.equal(torch.rand(4, device="cuda", generator=ours),
                           torch.rand(4, device="cuda", generator=theirs))


@torch.inference_mode()
def test_no_garbage_collection_inside_a_capture(monkeypatch):
    """The cyclic garbage collector is off while a graph is captured: a dropped engine (a reference cycle through
    its thread) holds CUDA graphs and pinned memory, and freeing those inside a capture invalidates it ("operation
    failed due to a previous error during capture", seen with several engines in one process)."""
    collecting = []
    enter = torch.cuda.graph.__enter__

    def recording_enter(self):
        enter(self)
        collecting.append(gc.isenabled())

    monkeypatch.setattr(torch.cuda.graph, "__enter__", recording_enter)
    model, _ = _model(torch.bfloat16)
    assert gc.isenabled()
    runner = ModelRunner(model, 4)
    assert runner.decoder.prefill_buckets == [64, 128, 256, 512, 1024]  # and steps of 1, 2 and 4 rows
    assert collecting == [False] * 8 and gc.isenabled()
