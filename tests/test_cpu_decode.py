"""The native CPU decode step (bitnet158.kernels.cpu_decode) against the model's PyTorch forward."""

from __future__ import annotations

import pytest
import torch

from bitnet158 import BitNetForCausalLM
from bitnet158.cli.model_loading import embedded_model_path
from bitnet158.generation.generate import generate_tokens
from bitnet158.generation.sampling import SamplingParams
from bitnet158.kernels import cpu, cpu_decode
from bitnet158.model import KVCache
from bitnet158.model.slot_cache import SlotCache
from bitnet158.nn.convert import freeze_

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"native CPU kernels unavailable: {cpu.IMPORT_ERROR}")

PROMPTS = [[0, 5, 17, 400, 3, 99, 8000], [0, 7, 8, 9]]  # the second is left-padded by 3


@pytest.fixture(scope="module")
def model() -> BitNetForCausalLM:
    return BitNetForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32)


def _prefilled(model: BitNetForCausalLM, dtype: torch.dtype) -> tuple[KVCache, torch.Tensor]:
    longest = max(map(len, PROMPTS))
    cache = KVCache(model.config, len(PROMPTS), 64, "cpu", dtype)
    cache.set_padding(torch.tensor([longest - len(p) for p in PROMPTS]))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in PROMPTS])
    return cache, model(ids, cache)[:, -1]


def _copy(cache: KVCache) -> KVCache:
    other = KVCache.__new__(KVCache)
    other.__dict__.update({k: v.clone() if torch.is_tensor(v) else v for k, v in cache.__dict__.items()})
    return other


@torch.inference_mode()
def test_one_step_matches_the_pytorch_forward(model, isa, monkeypatch):
    cache, logits = _prefilled(model, torch.float32)
    native_cache, tokens = _copy(cache), logits.argmax(-1)[:, None]
    native = cpu_decode.decode_step(model, tokens, native_cache)
    assert native is not None and native.shape == (2, 1, model.config.vocab_size)
    monkeypatch.setenv("BITNET158_CPU_KERNELS", "0")  # the model's own forward with the reference kernels
    expected = model(tokens, cache)
    assert native_cache.length == cache.length
    scale = expected.abs().max()
    assert (native - expected).abs().max() < 1e-5 * scale
    slot = cache.length - 1
    for name in ("keys", "values"):
        ours, theirs = getattr(native_cache, name)[:, :, :, slot], getattr(cache, name)[:, :, :, slot]
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), name


def test_greedy_generation_is_unchanged(model, monkeypatch):
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    native = torch.stack(list(generate_tokens(model, PROMPTS, params)))
    assert model.__dict__.get("_native_decoder") is not None  # the native decoder ran
    monkeypatch.setenv("BITNET158_CPU_KERNELS", "0")
    assert torch.equal(native, torch.stack(list(generate_tokens(model, PROMPTS, params))))


@torch.inference_mode()
def test_bfloat16_model_decodes_close_to_its_pytorch_path(isa, monkeypatch):
    model = BitNetForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.bfloat16)
    cache, logits = _prefilled(model, torch.bfloat16)
    native_cache, tokens = _copy(cache), logits.argmax(-1)[:, None]
    native = cpu_decode.decode_step(model, tokens, native_cache)
    assert native.dtype == torch.bfloat16
    monkeypatch.setenv("BITNET158_CPU_KERNELS", "0")
    expected = model(tokens, cache).float()
    # The PyTorch path rounds activations to bfloat16 at every op, the native one keeps float32.
    assert (native.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_falls_back_where_it_does_not_apply(model):
    cache, _ = _prefilled(model, torch.float32) if False else (KVCache(model.config, 1, 8), None)
    token = torch.tensor([[5]])
    with torch.enable_grad():  # autograd wants the PyTorch graph
        assert cpu_decode.decode_step(model, token, cache) is None
    with torch.no_grad():
        assert cpu_decode.decode_step(model, torch.tensor([[5, 6]]), cache) is None  # not one token
        assert cpu_decode.decode_step(model, token, object()) is None  # neither a KVCache nor a SlotBatch
        slots = SlotCache(model.config, 2, 8)
        assert cpu_decode.decode_step(model, torch.tensor([[5]]), slots.batch([0], [1])) is not None
        assert cpu_decode.decode_step(model, torch.tensor([[5, 6]]), slots.batch([1], [2])) is None  # a prefill
        with pytest.raises(IndexError, match="vocabulary"):
            cpu_decode.decode_step(model, torch.tensor([[model.config.vocab_size]]), cache)


@pytest.fixture(params=["embedded", "odd-heads", "odd-head-dim"])
def slot_model(request, model, make_model) -> BitNetForCausalLM:
    """The embedded model, and tiny packed ones whose attention leaves remainders in the kernels' blocks of
    4 query heads, 64 head dimensions and 16-wide vectors (5 query heads per key/value head and head_dim 80;
    3 and head_dim 40)."""
    if request.param == "embedded":
        return model
    if request.param == "odd-heads":
        return freeze_(make_model(num_attention_heads=10, num_key_value_heads=2, head_dim=80))
    return freeze_(make_model(num_attention_heads=6, num_key_value_heads=2, head_dim=40))


def _ids(model: BitNetForCausalLM, tokens: list[int]) -> list[int]:
    return [t % model.config.vocab_size for t in tokens]


@torch.inference_mode()
def test_slot_steps_match_the_pytorch_forward(slot_model, isa, assert_logits_match):
    """Prompt chunks and decoding tokens of several slots in one native step: every slot's logits are those of
    the model's own forward over its whole sequence, and stale keys in a slot are never seen."""
    model = slot_model
    cache = SlotCache(model.config, num_slots=4, max_length=32)
    cache.keys.normal_()
    cache.values.normal_()
    prompts = {0: [0, 5, 17, 400, 3, 99, 8000], 2: [0, 7, 8], 3: [0, 12, 300, 41, 5]}
    prompts = {slot: _ids(model, prompt) for slot, prompt in prompts.items()}
    sequences = {slot: [] for slot in prompts}
    # (slot, new tokens) per step: whole prompts, chunks of prompts and decoding side by side
    steps = [[(0, prompts[0]), (2, prompts[2][:2]), (3, prompts[3][:1])],
             [(0, [11]), (2, prompts[2][2:]), (3, prompts[3][1:])],
             [(0, [12]), (2, [13]), (3, [14])],
             [(3, [15]), (0, [16])]]
    actual, expected = [], []
    for work in steps:
        slots, tokens = [slot for slot, _ in work], [new for _, new in work]
        logits = cpu_decode.forward_slots(model, cache, slots, tokens)
        for row, (slot, new) in enumerate(work):
            sequences[slot] += new
            assert cache.lengths[slot] == len(sequences[slot])
            actual.append(logits[row])
            expected.append(model(torch.tensor([sequences[slot]]))[0, -1])
    # A code that rounds the other way carries through its slot's later positions (with the portable kernels on
    # an AMD EPYC, slots 2 and 3 from their second step: 5 of 11 positions within float32 rounding), so only
    # each slot's first logits must all agree to float32 rounding; the rest to the usual bounds.
    first_step = len(steps[0])
    assert_logits_match(torch.stack(actual[:first_step]), torch.stack(expected[:first_step]), tight_share=1.0)
    assert_logits_match(torch.stack(actual), torch.stack(expected), tight_share=0.0)


@torch.inference_mode()
def test_slot_rows_do_not_depend_on_chunks_or_neighbours(slot_model, isa):
    """A sequence gets the same logits and cache entries, bit for bit, alone with its whole prompt, fed token by
    token, or cut into other chunks in another slot beside other sequences (what the server relies on)."""
    model = slot_model
    prompt, continuation = _ids(model, [0, 5, 17, 400, 3, 99, 8000, 12, 7]), _ids(model, [44, 45, 46])
    others = [_ids(model, o) for o in ([0, 9, 8, 7, 6, 5], [0, 100, 101], [0, 1000, 2000, 3000])]

    def run(slot: int, chunks: list[list[int]], neighbours: list[list[list[int]]]) -> tuple[torch.Tensor, ...]:
        cache = SlotCache(model.config, num_slots=4, max_length=32)
        logits = []
        for step, chunk in enumerate(chunks + [[t] for t in continuation]):
            extra = [n[step] for n in neighbours if step < len(n)]
            free = [s for s in range(4) if s != slot][: len(extra)]
            out = cpu_decode.forward_slots(model, cache, [*free, slot], [*extra, chunk])
            logits.append(out[-1])
        end = len(prompt) + len(continuation)
        return torch.stack(logits[len(chunks) - 1:]), cache.keys[:, slot, :, :end], cache.values[:, slot, :, :end]

    alone = run(0, [prompt], [])
    by_token = run(1, [[t] for t in prompt], [])
    mixed = run(3, [prompt[:3], prompt[3:7], prompt[7:]], [[o[:2], o[2:], [1], [2], [3]] for o in others])
    for other in (by_token, mixed):
        for a, b in zip(alone, other, strict=True):
            assert torch.equal(a, b)


@torch.inference_mode()
def test_new_weights_rebuild_the_decoder():
    model = BitNetForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32)
    cache, logits = _prefilled(model, torch.float32)
    tokens = logits.argmax(-1)[:, None]
    before = cpu_decode.decode_step(model, tokens, _copy(cache))
    layer = model.model.layers[0].mlp.down_proj
    with torch.inference_mode(False):
        layer.set_weight(torch.randn(layer.out_features, layer.in_features))
    after = cpu_decode.decode_step(model, tokens, _copy(cache))  # a new cache: the weights are checked
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_lm_head_rows_do_not_depend_on_the_batch(isa, dtype):
    # Batches of every size up to 9 pass rows through the kernels' groups of 4 or 2 inputs and the rest.
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(1031, 519, generator=generator).to(dtype)
    x = torch.randn(9, 519, generator=generator)
    handle, keep = _head_only_decoder(weight)

    def logits(rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty(rows.shape[0], 1031)
        cpu._cpu.decoder_lm_head(handle, rows.data_ptr(), rows.shape[0], out.data_ptr())
        return out

    alone = torch.cat([logits(x[i : i + 1].clone()) for i in range(9)])
    for batch in range(2, 10):
        assert torch.equal(logits(x[:batch].clone()), alone[:batch]), f"{isa} {dtype} batch {batch}"


def _head_only_decoder(weight: torch.Tensor):
    """A native decoder with no layers around `weight` [vocab, hidden]: enough for decoder_lm_head."""
    vocab, hidden = weight.shape
    dtype = {torch.float32: 0, torch.bfloat16: 1}[weight.dtype]
    norm, inv_freq = torch.ones(hidden), torch.ones(1)
    handle = cpu._cpu.decoder_new((hidden, 1, 1, 2, 1, vocab, 1e-5, True, dtype, dtype),
                                  (weight.data_ptr(), weight.data_ptr(), norm.data_ptr(), inv_freq.data_ptr()), [])
    return handle, (weight, norm, inv_freq)  # the tensors must outlive the handle


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_lm_head_matches_float64_on_odd_shapes(isa, dtype):
    # Shapes that leave remainders everywhere: rows per pass (4), SIMD steps (8/16/32), threads' ranges.
    generator = torch.Generator().manual_seed(7)
    for vocab, hidden, batch, threads in [(1, 1, 1, 1), (7, 5, 1, 2), (103, 67, 3, 3), (4099, 256, 2, 2),
                                          (1031, 2560, 1, 2), (65, 519, 1, 1)]:
        cpu.set_threads(threads)
        weight = torch.randn(vocab, hidden, generator=generator).to(dtype)
        x = torch.randn(batch, hidden, generator=generator)
        handle, keep = _head_only_decoder(weight)
        logits = torch.full((batch, vocab), float("nan"))
        cpu._cpu.decoder_lm_head(handle, x.data_ptr(), batch, logits.data_ptr())
        expected = x.double() @ weight.double().T
        bound = 1e-5 * (x.double().abs() @ weight.double().abs().T) + 1e-30  # float32 rounding of the sum
        assert torch.all((logits.double() - expected).abs() <= bound), f"{isa} {dtype} {vocab}x{hidden} batch {batch}"
