"""Fused q/k/v and gate/up projections (used on the GPU) compute what the separate layers compute,
and `save_pretrained` of a fused model writes the unfused Hugging Face names. Runs on the CPU."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from bitnet158 import BitNetForCausalLM, freeze_
from bitnet158.model.bitnet import fuse_projections_, unfuse_projections_


def test_fused_projections_give_identical_logits_and_save_unfused(make_model, tmp_path):
    model = freeze_(make_model())
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = model(ids)
        fuse_projections_(model)
        assert hasattr(model.model.layers[0].self_attn, "qkv_proj")
        assert not hasattr(model.model.layers[0].mlp, "gate_proj")
        assert model.model.layers[0].self_attn.qkv_proj.weight_scale.shape == (64 + 2 * 32,)
        assert torch.equal(model(ids), expected)
    model.save_pretrained(tmp_path)
    assert hasattr(model.model.layers[0].self_attn, "qkv_proj")  # still fused after saving
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.layers.1.mlp.up_proj.weight_scale" in names
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)
    reloaded = BitNetForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids), expected)


def test_unfuse_restores_the_original_layers(make_model):
    model = freeze_(make_model())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unfuse_projections_(fuse_projections_(model))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
