"""The BitNet model: shapes, the 2B4T configuration, KV-cache decoding, left padding, embeddings tying."""

from pathlib import Path

import pytest
import torch

from bitnet158 import BitLinear, BitNetConfig, BitNetForCausalLM, KVCache, PackedBitLinear, freeze_

REFERENCE_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "reference" / "bitnet-b1.58-2B-4T.config.json"


@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 7), (3, 16)])
def test_logits_shape(make_model, batch, seq):
    model = make_model()
    ids = torch.randint(0, 211, (batch, seq))
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (batch, seq, 211)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_causal_earlier_logits_ignore_later_tokens(make_model, assert_logits_match):
    model = make_model()
    ids = torch.randint(0, 211, (2, 9))
    changed = ids.clone()
    changed[:, 6:] = torch.randint(0, 211, (2, 3))
    with torch.no_grad():
        assert_logits_match(model(changed)[:, :6], model(ids)[:, :6])


def test_reference_2b4t_config():
    config = BitNetConfig.from_json(REFERENCE_CONFIG)
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (128256, 2560, 6912)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 20, 5)
    assert config.head_dim == 128
    assert config.hidden_act == "relu2"
    assert config.rope_theta == 500000.0
    assert config.max_position_embeddings == 4096
    assert config.tie_word_embeddings is True
    assert config.linear_class == "autobitlinear"
    assert config.eos_token_ids == [128001]
    counts = config.num_parameters()
    # 30 layers of q, k, v, o and gate, up, down; one tied 128256 x 2560 embedding plus norms
    ternary = 30 * (2560 * 2560 + 2 * 2560 * 640 + 2560 * 2560 + 3 * 2560 * 6912)
    assert counts["ternary"] == ternary
    assert counts["high_precision"] == 128256 * 2560 + 30 * (2 * 2560 + 2560 + 6912) + 2560
    assert 2.3e9 < counts["ternary"] + counts["high_precision"] < 2.5e9


def test_2b4t_tensor_names_and_shapes():
    """Built on the meta device (no memory): the names and shapes of Microsoft's packed checkpoint."""
    config = BitNetConfig.from_json(REFERENCE_CONFIG)
    with torch.device("meta"):
        model = freeze_(BitNetForCausalLM(config))
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    layer = "model.layers.29"
    expected = {
        "model.embed_tokens.weight": (128256, 2560),
        "model.norm.weight": (2560,),
        f"{layer}.input_layernorm.weight": (2560,),
        f"{layer}.post_attention_layernorm.weight": (2560,),
        f"{layer}.self_attn.q_proj.weight": (640, 2560),
        f"{layer}.self_attn.k_proj.weight": (160, 2560),
        f"{layer}.self_attn.v_proj.weight": (160, 2560),
        f"{layer}.self_attn.o_proj.weight": (640, 2560),
        f"{layer}.self_attn.attn_sub_norm.weight": (2560,),
        f"{layer}.mlp.gate_proj.weight": (1728, 2560),
        f"{layer}.mlp.up_proj.weight": (1728, 2560),
        f"{layer}.mlp.down_proj.weight": (640, 6912),
        f"{layer}.mlp.ffn_sub_norm.weight": (6912,),
        f"{layer}.mlp.down_proj.weight_scale": (1,),
    }
    assert {name: shapes.get(name) for name in expected} == expected
    assert "model.layers.30.input_layernorm.weight" not in shapes
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_config_dict_round_trip():
    config = BitNetConfig.from_json(REFERENCE_CONFIG)
    assert BitNetConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("frozen", [False, True])
def test_kv_cache_decode_equals_full_forward(make_model, assert_logits_match, frozen):
    model = make_model()
    if frozen:
        freeze_(model)
    ids = torch.randint(0, 211, (2, 11))
    cache = KVCache(model.config, batch_size=2, max_length=16)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :5], cache)]
        steps += [model(ids[:, t : t + 1], cache) for t in range(5, 11)]
    assert cache.length == 11
    assert_logits_match(torch.cat(steps, dim=1), full)


def test_kv_cache_overflow_is_refused(make_model):
    model = make_model()
    cache = KVCache(model.config, batch_size=1, max_length=4)
    with pytest.raises(ValueError, match="5 tokens do not fit a KV cache of 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)


def test_left_padded_batch_matches_each_sequence_alone(make_model, assert_logits_match):
    model = freeze_(make_model())
    prompts = [torch.randint(3, 211, (n,)) for n in (7, 3, 5)]
    longest = max(len(p) for p in prompts)
    pad_id = 0
    batch = torch.stack([torch.cat([torch.full((longest - len(p),), pad_id), p]) for p in prompts])
    next_tokens = torch.randint(3, 211, (3, 2))

    cache = KVCache(model.config, batch_size=3, max_length=longest + 2)
    cache.set_padding(torch.tensor([longest - len(p) for p in prompts]))
    with torch.no_grad():
        batched = [model(batch, cache)[:, -1]]
        batched += [model(next_tokens[:, i : i + 1], cache)[:, -1] for i in range(2)]
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, next_tokens[row]])[None])[0]
            n = len(prompt)
            assert_logits_match(torch.stack([b[row] for b in batched]), alone[n - 1 : n + 2])


def test_padding_changes_nothing_but_is_needed(make_model):
    """Without `set_padding` the pad tokens are attended to and the logits change: the test above can fail."""
    model = make_model()
    prompt = torch.randint(3, 211, (4,))
    padded = torch.cat([torch.zeros(3, dtype=torch.long), prompt])[None]
    with torch.no_grad():
        alone = model(prompt[None])[0, -1]
        unmasked = model(padded, KVCache(model.config, 1, 7))[0, -1]
    assert (unmasked - alone).abs().max() > 1e-2


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_embeddings(make_model, tie):
    model = make_model(tie_word_embeddings=tie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert ("lm_head.weight" in dict(model.named_parameters())) == (not tie)

    normed = []
    model.model.norm.register_forward_hook(lambda module, args, out: normed.append(out))
    with torch.no_grad():
        logits = model(torch.randint(0, 211, (2, 5)))
        by_embeddings = normed[0] @ model.model.embed_tokens.weight.T
        by_own_head = normed[0] @ model.lm_head.weight.T
    torch.testing.assert_close(logits, by_own_head, rtol=1e-4, atol=1e-4)
    assert torch.allclose(logits, by_embeddings, rtol=1e-4, atol=1e-4) == tie


def test_silu_variant_runs_and_differs_from_relu2(make_model):
    relu2 = make_model()
    silu = make_model(hidden_act="silu")
    silu.load_state_dict(relu2.state_dict())
    ids = torch.randint(0, 211, (2, 6))
    with torch.no_grad():
        out_silu, out_relu2 = silu(ids), relu2(ids)
    assert torch.isfinite(out_silu).all()
    assert (out_silu - out_relu2).abs().max() > 1e-2


def test_fresh_model_trains_and_freezes(make_model, assert_logits_match):
    model = make_model().train()
    assert sum(isinstance(m, BitLinear) for m in model.modules()) == 2 * 7
    ids = torch.randint(0, 211, (2, 8))
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.grad is not None and q_proj.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        expected = model(ids)
        freeze_(model)
        assert sum(isinstance(m, PackedBitLinear) for m in model.modules()) == 2 * 7
        assert_logits_match(model(ids), expected)
