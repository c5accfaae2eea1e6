"""Parity with transformers' BitNet in both directions: one checkpoint folder, the same logits.

transformers -> ours: a random float transformers model is quantized with transformers' own functions
(`WeightQuant`, `pack_weights`), put into a transformers model converted by `replace_with_bitnet_linear`,
saved with transformers' `save_pretrained` and loaded by both libraries. Every storage transformers
supports is covered:
- `bitlinear` (packed uint8, `weight_scale = 1 / mean|W|`, the output divided by it);
- `autobitlinear` offline, packed (`weight_scale = mean|W|`, the layout of microsoft/bitnet-b1.58-2B-4T);
- `autobitlinear` offline with float {-1, 0, 1} weights;
- `autobitlinear` online: full-precision master weights quantized at run time (by us: at load).
ours -> transformers: our `save_pretrained` output loads in transformers' `from_pretrained`.
Tied and untied embeddings, single-file and sharded folders, 4 query heads sharing 2 key/value heads.

Everything runs in float32 on CPU with transformers' eager attention; logits are compared position by
position with `assert_logits_match` (conftest.py), which allows for an activation code rounded the
other way after a last-bit difference.
"""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import BitNetConfig as HFBitNetConfig
from transformers import BitNetForCausalLM as HFBitNetForCausalLM
from transformers import BitNetQuantConfig
from transformers.integrations.bitnet import (
    AutoBitLinear,
    BitLinear,
    WeightQuant,
    pack_weights,
    replace_with_bitnet_linear,
)

from bitnet158 import BitNetForCausalLM, KVCache, PackedBitLinear, freeze_
from bitnet158.packing import pack_2bit, unpack_2bit
from bitnet158.quant import quantize_ternary

pytestmark = pytest.mark.usefixtures("eager_compile")

HF_TINY = {
    "vocab_size": 211,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
Q_PROJ = "model.layers.0.self_attn.q_proj"


def hf_ternary(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' weight quantization: `WeightQuant` returns codes / (1 / s), whose sign is the code."""
    codes = WeightQuant.apply(weight.detach().clone()).sign()
    s = weight.detach().float().abs().mean().clamp(min=1e-5)  # WeightQuant's scale is 1 / s
    return codes, s


def save_with_transformers(
    float_model: HFBitNetForCausalLM, folder, linear_class: str, storage: str, max_shard_size: str
) -> None:
    """Quantize `float_model` the way transformers stores `linear_class` with `storage` and save it to `folder`."""
    mode = "online" if storage == "master" else "offline"
    quant_config = BitNetQuantConfig(
        linear_class=linear_class, quantization_mode=mode, modules_to_not_convert=["lm_head"]
    )
    config = HFBitNetConfig(**float_model.config.to_dict())
    config.quantization_config = quant_config
    model = replace_with_bitnet_linear(
        HFBitNetForCausalLM(config), modules_to_not_convert=["lm_head"], quantization_config=quant_config
    )

    state = float_model.state_dict()
    for name, module in float_model.named_modules():
        if not isinstance(module, nn.Linear) or name == "lm_head" or storage == "master":
            continue
        codes, s = hf_ternary(module.weight)
        if storage == "packed":
            state[f"{name}.weight"] = pack_weights(codes.clone())  # pack_weights adds 1 to its input in place
            # AutoBitLinear holds a float [out, in] weight; transformers unpacks a packed one when it loads.
            # Offline layers never train, so the packed tensor may take its place for saving.
            model.get_submodule(name).weight = nn.Parameter(state[f"{name}.weight"], requires_grad=False)
        else:
            state[f"{name}.weight"] = codes
        state[f"{name}.weight_scale"] = (1 / s if linear_class == "bitlinear" else s).reshape(1)
    if config.tie_word_embeddings:
        del state["lm_head.weight"]

    result = model.load_state_dict(state, strict=False, assign=True)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    model.tie_weights()
    model.save_pretrained(folder, max_shard_size=max_shard_size)


def load_with_transformers(folder, dtype: torch.dtype = torch.float32) -> HFBitNetForCausalLM:
    return HFBitNetForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()


def assert_transformers_holds_our_layers(theirs: HFBitNetForCausalLM, ours: BitNetForCausalLM) -> None:
    for name, layer in ours.named_modules():
        if isinstance(layer, PackedBitLinear):
            their_layer = theirs.get_submodule(name)
            assert isinstance(their_layer, AutoBitLinear) and not their_layer.online_quant, name
            codes = unpack_2bit(layer.weight, layer.out_features).to(their_layer.weight.dtype)
            assert torch.equal(their_layer.weight, codes), name
            assert torch.equal(their_layer.weight_scale, layer.weight_scale.to(their_layer.weight_scale.dtype)), name


def stored_dtype(folder, name: str) -> str:
    index = folder / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(folder / file, framework="pt") as f:
        return f.get_slice(name).get_dtype()


@pytest.mark.parametrize(
    "linear_class, storage, weight_dtype",
    [
        ("bitlinear", "packed", "U8"),
        ("autobitlinear", "packed", "U8"),
        ("autobitlinear", "ternary", "F32"),
        ("autobitlinear", "master", "F32"),
    ],
)
@pytest.mark.parametrize(
    "tie, max_shard_size", [(True, "1GB"), (False, "20KB")], ids=["tied-single-file", "untied-sharded"]
)
def test_transformers_checkpoint_loads_in_ours(
    tmp_path, randomize, assert_logits_match, linear_class, storage, weight_dtype, tie, max_shard_size
):
    float_model = randomize(HFBitNetForCausalLM(HFBitNetConfig(**HF_TINY, tie_word_embeddings=tie)).float())
    save_with_transformers(float_model, tmp_path, linear_class, storage, max_shard_size)
    assert (tmp_path / "model.safetensors.index.json").exists() == (max_shard_size == "20KB")
    assert stored_dtype(tmp_path, f"{Q_PROJ}.weight") == weight_dtype

    theirs = load_with_transformers(tmp_path)
    expected_layer = BitLinear if linear_class == "bitlinear" else AutoBitLinear
    assert isinstance(theirs.get_submodule(Q_PROJ), expected_layer)
    ours = BitNetForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.config.tie_word_embeddings == tie

    # The packed weights and scales we hold are transformers' quantization of the float weights.
    for name, layer in ours.named_modules():
        if isinstance(layer, PackedBitLinear):
            codes, s = hf_ternary(float_model.get_submodule(name).weight)
            assert torch.equal(unpack_2bit(layer.weight, layer.out_features), codes.to(torch.int8)), name
            torch.testing.assert_close(layer.weight_scale, s.reshape(1), rtol=1e-6, atol=0)

    ids = torch.randint(0, 211, (2, 9))
    with torch.no_grad():
        their_logits = theirs(ids).logits
        assert_logits_match(ours(ids), their_logits)
        # and back: our save (autobitlinear, weight_scale = s) gives transformers the same model again
        ours.save_pretrained(tmp_path / "ours")
        assert_logits_match(load_with_transformers(tmp_path / "ours")(ids).logits, their_logits)


@pytest.mark.parametrize(
    "tie, max_shard_bytes", [(True, 2**30), (False, 20_000)], ids=["tied-single-file", "untied-sharded"]
)
def test_our_checkpoint_loads_in_transformers(tmp_path, make_model, assert_logits_match, tie, max_shard_bytes):
    model = make_model(tie_word_embeddings=tie)  # torch_dtype float32: nothing is rounded on the way to disk
    model.save_pretrained(tmp_path, max_shard_bytes=max_shard_bytes)
    assert (tmp_path / "model.safetensors.index.json").exists() == (max_shard_bytes == 20_000)
    ours = BitNetForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    theirs = load_with_transformers(tmp_path)

    assert theirs.config.tie_word_embeddings == tie
    assert (theirs.lm_head.weight is theirs.model.embed_tokens.weight) == tie
    assert_transformers_holds_our_layers(theirs, ours)
    ids = torch.randint(0, 211, (3, 8))
    with torch.no_grad():
        their_logits = theirs(ids).logits
        assert_logits_match(ours(ids), their_logits)
        assert_logits_match(freeze_(model)(ids), their_logits)


def test_our_bfloat16_checkpoint_loads_in_transformers(tmp_path, make_model):
    """Microsoft's dtype layout: bf16 embeddings and norms, uint8 weights.

    transformers loads a packed offline autobitlinear folder only in the checkpoint's dtype: asked for
    float32, it leaves the embeddings in bf16 and its float32 layers then fail on the mixed dtypes (a bf16
    folder saved by transformers itself does the same). bf16 arithmetic moves these logits by several
    percent in transformers alone, so this test compares the tensors that transformers loaded."""
    model = make_model(tie_word_embeddings=True, torch_dtype="bfloat16")
    model.save_pretrained(tmp_path)
    theirs = load_with_transformers(tmp_path, dtype=torch.bfloat16)
    ours = BitNetForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)

    assert_transformers_holds_our_layers(theirs, ours)
    for name, tensor in ours.state_dict().items():
        if tensor.is_floating_point() and not name.endswith("weight_scale"):
            assert torch.equal(theirs.get_parameter(name), tensor), name
    with torch.no_grad():
        assert torch.isfinite(theirs(torch.randint(0, 211, (1, 4))).logits).all()


def test_greedy_generation_matches_transformers(tmp_path, make_model):
    """Our KV-cache decoding and transformers' `generate` pick the same tokens from the same checkpoint."""
    make_model(tie_word_embeddings=True).save_pretrained(tmp_path)
    ours = BitNetForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    theirs = load_with_transformers(tmp_path)
    prompt = torch.randint(3, 211, (1, 5))
    new_tokens = 8

    expected = theirs.generate(
        prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, 5:]
    cache = KVCache(ours.config, batch_size=1, max_length=5 + new_tokens)
    generated, step_input = [], prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            token = ours(step_input, cache)[0, -1].argmax()
            generated.append(token.item())
            step_input = token.reshape(1, 1)
    assert generated == expected.tolist()


@pytest.mark.parametrize("in_features", [1, 17, 64, 1000])
@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_layer_matches_transformers_layer(linear_class, in_features):
    out_features = 12  # transformers' packed BitLinear holds out_features // 4 rows: a multiple of 4
    weight = torch.randn(out_features, in_features)
    ours = PackedBitLinear(in_features, out_features)
    ours.set_weight(weight)
    quantized = quantize_ternary(weight)
    if linear_class == "bitlinear":
        theirs = BitLinear(in_features, out_features, bias=False, dtype=torch.float32)
        theirs.weight.copy_(pack_2bit(quantized.codes))
        theirs.weight_scale.copy_(1 / quantized.scale)
    else:
        theirs = AutoBitLinear(in_features, out_features, bias=False, online_quant=True)
        theirs.weight.data.copy_(weight)
    x = torch.randn(2, 5, in_features) * 4
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
