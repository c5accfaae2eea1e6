"""The server's CUDA path: graph-captured steps over the slot cache (`SlotDecoder`), one token per request and
step, prompts included. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from test_serve_scheduler import _serve

from bitnet158 import BitNetForCausalLM
from bitnet158.cli.model_loading import embedded_model_path
from bitnet158.serve.runner import ModelRunner
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
    """Prompts of 2 to 80 tokens decoding together: each request's logits are those of the model's ordinary
    forward over its prompt and tokens (float32), and so are its greedy tokens where the top two logits are apart.

    The prompt goes through the graph one token at a time, its norm summed in another order than torch's, so an
    activation code may move by one step early on and shift all later logits by a little (not float32 rounding)."""
    model, prompts = _model(torch.float32)
    runner = ModelRunner(model, 4)
    assert runner.prompt_chunk == 1 and runner.decoder is not None
    assert max(len(p) for p in prompts) > 64  # past the first split of the attention (64 positions)
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
