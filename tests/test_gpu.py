"""The model and generation on a CUDA device agree with the CPU. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from bitnet158 import BitNetForCausalLM
from bitnet158.cli.model_loading import embedded_model_path
from bitnet158.generation import SamplingParams, generate
from bitnet158.kernels import ternary_matmul
from bitnet158.tokenizer import Tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize(("m", "k", "n"), [(1, 2560, 3840), (7, 333, 65), (64, 6912, 2560)])
def test_ternary_matmul_on_gpu_is_exact(m: int, k: int, n: int):
    act = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    weight = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    expected = act.long() @ weight.long().T
    assert torch.equal(ternary_matmul(act.cuda(), weight.cuda()).cpu().long(), expected)


def test_embedded_model_logits_on_gpu_match_cpu(assert_logits_match):
    cpu = BitNetForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32)
    gpu = BitNetForCausalLM.from_pretrained(embedded_model_path(), device="cuda", dtype=torch.float32)
    ids = torch.randint(0, cpu.config.vocab_size, (2, 37))
    with torch.no_grad():
        assert_logits_match(gpu(ids.cuda()).cpu(), cpu(ids))


def test_greedy_generation_on_gpu_in_bf16_continues_the_prompt():
    model = BitNetForCausalLM.from_pretrained(embedded_model_path(), device="cuda")
    assert model.dtype == torch.bfloat16
    tokenizer = Tokenizer.from_pretrained(embedded_model_path())
    params = SamplingParams(max_new_tokens=32, temperature=0)
    batched = generate(model, tokenizer, ["def fibonacci(n):", "import os"], params)
    alone = [generate(model, tokenizer, [prompt], params)[0] for prompt in ("def fibonacci(n):", "import os")]
    assert all(len(text) > 20 for text in batched)
    assert batched == alone
