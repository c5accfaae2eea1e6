"""Our GGUF files in llama.cpp (through llama-cpp-python): a SiLU BitNet exported as TQ2_0 or TQ1_0
generates the same greedy tokens as our model, with logits within llama.cpp's activation rounding.

llama.cpp's `bitnet` graph always uses SiLU in the MLP, so it runs our relu² models as a different
network: the last test shows that it agrees with our model once our MLP is switched to SiLU too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_tokenizer import write_tokenizer_folder

from bitnet158 import BitNetForCausalLM
from bitnet158.cli.model_loading import embedded_model_path
from bitnet158.formats.gguf_export import save_gguf
from bitnet158.tokenizer import Tokenizer

if os.environ.get("CI"):  # CI installs the llama extra: these tests must run there, not skip
    import llama_cpp
else:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")

pytestmark = [pytest.mark.llama_cpp, pytest.mark.usefixtures("one_torch_thread")]

SILU_MODEL = Path(__file__).parent / "data" / "silu_bitnet"
PROMPTS = ["import os\n", "def main(", "class Stack:\n    def "]
STEPS = 32




def _export(source: Path, tmp_path: Path, ternary_type: str) -> tuple[BitNetForCausalLM, Tokenizer, Path]:
    if not (source / "config.json").is_file():
        pytest.skip(f"{source} is missing")
    model = BitNetForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(source)
    path = tmp_path / f"model-{ternary_type}.gguf"
    save_gguf(model, tokenizer, path, ternary_type)
    return model, tokenizer, path


def _llama(path: Path):
    return llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, n_threads=2, verbose=False)


@torch.no_grad()
def _greedy(model: BitNetForCausalLM, ids: list[int]) -> list[int]:
    ids = list(ids)
    for _ in range(STEPS):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.mark.parametrize("ternary_type", ["tq2_0", "tq1_0"])
def test_silu_model_matches_llama_cpp(tmp_path: Path, ternary_type: str):
    model, tokenizer, path = _export(SILU_MODEL, tmp_path, ternary_type)
    llm = _llama(path)
    for prompt in PROMPTS:
        prompt_ids = tokenizer.encode(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == prompt_ids
        ours = _greedy(model, prompt_ids)
        llm.reset()
        theirs = [token for token, _ in zip(llm.generate(prompt_ids, temp=0.0, top_k=1), range(STEPS), strict=False)]
        assert theirs == ours[len(prompt_ids):], prompt

        expected = model(torch.tensor([ours]))[0].detach().numpy()
        actual = _llama_logits(llm, ours)
        difference = np.abs(actual - expected).max()
        scale = np.abs(expected).max()
        # llama.cpp rounds activations to 8 bits per 256-value block (q8_K), we per token: about 2%.
        assert difference < 0.04 * scale, f"{prompt!r}: max logit difference {difference:.3f} (scale {scale:.1f})"
        # Same top token wherever our top-2 gap is wider than the two computations can differ.
        top2 = np.sort(expected, axis=-1)[:, -2:]
        decisive = top2[:, 1] - top2[:, 0] > 2 * difference
        assert np.array_equal(actual.argmax(-1)[decisive], expected.argmax(-1)[decisive])


def test_relu2_model_runs_as_silu_in_llama_cpp(tmp_path: Path):
    model, tokenizer, path = _export(embedded_model_path(), tmp_path, "tq2_0")
    llm = _llama(path)
    ids = _greedy(model, tokenizer.encode(PROMPTS[0]))
    actual = _llama_logits(llm, ids)
    expected = model(torch.tensor([ids]))[0].detach().numpy()
    assert np.abs(actual - expected).max() > 0.5 * np.abs(expected).max()  # relu² vs SiLU: another network
    for layer in model.model.layers:
        layer.mlp.relu2 = False  # what llama.cpp computes
    as_silu = model(torch.tensor([ids]))[0].detach().numpy()
    assert np.abs(actual - as_silu).max() < 0.04 * np.abs(as_silu).max()


@pytest.mark.parametrize("llama3", [False, True])
def test_llama_cpp_tokenizes_like_us(make_model, tmp_path: Path, llama3: bool):
    """GPT-2's pre-tokenizer (our models) and Llama 3's (Microsoft's 2B4T), by llama.cpp's own tokenizer."""
    tokenizer = Tokenizer.from_pretrained(write_tokenizer_folder(tmp_path / "tokenizer", llama3=llama3))
    model = make_model(vocab_size=400, hidden_size=256, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=True)
    save_gguf(model, tokenizer, tmp_path / "model.gguf")
    llm = llama_cpp.Llama(str(tmp_path / "model.gguf"), vocab_only=True, verbose=False)
    for text in [*PROMPTS, "a million is 1000000, pi 3.14159", "DON'T SHOUT!!\n\n  ok", "naïve élève 🙂"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text), text


def test_llama_cpp_refuses_i2_s(tmp_path: Path):
    _, _, path = _export(SILU_MODEL, tmp_path, "i2_s")
    with pytest.raises(ValueError):
        _llama(path)
    assert BitNetForCausalLM.from_pretrained(path) is not None  # while we read it

