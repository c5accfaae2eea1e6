"""`bitnet158 convert` between packed HF folders, GGUF files and dense bf16 folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_tokenizer import write_tokenizer_folder
from typer.testing import CliRunner

from bitnet158 import BitNetForCausalLM
from bitnet158.cli.main import app
from bitnet158.nn import freeze_
from bitnet158.nn.bitlinear import PackedBitLinear
from bitnet158.packing import unpack_2bit

SHAPE = {"vocab_size": 400, "hidden_size": 256, "intermediate_size": 256, "num_attention_heads": 4,
         "num_key_value_heads": 2, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 1,
         "torch_dtype": "bfloat16"}


@pytest.fixture
def folder(make_model, tmp_path: Path) -> Path:
    model = freeze_(make_model(**SHAPE))
    model.save_pretrained(tmp_path / "src")
    write_tokenizer_folder(tmp_path / "src")
    return tmp_path / "src"


def convert(*args: str) -> None:
    result = CliRunner().invoke(app, ["convert", *map(str, args)])
    assert result.exit_code == 0, result.output + repr(result.exception)


def _layers(model: BitNetForCausalLM) -> dict[str, PackedBitLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedBitLinear)}


@pytest.mark.parametrize("ternary_type", ["tq2_0", "tq1_0", "i2_s"])
def test_hf_to_gguf_to_hf_is_exact(folder: Path, tmp_path: Path, ternary_type: str):
    convert(folder, tmp_path / "model.gguf", "--to", "gguf", "--type", ternary_type)
    convert(tmp_path / "model.gguf", tmp_path / "back", "--to", "hf")
    source = BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32)
    back = BitNetForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    for name, tensor in source.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name  # bf16 embeddings go through F16 exactly here
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    ids = torch.tensor([[0, 5, 17, 230]])
    assert torch.equal(back(ids), source(ids))


def test_hf_bf16_is_dense_codes_times_scale(folder: Path, tmp_path: Path):
    from transformers import BitNetForCausalLM as HFBitNetForCausalLM

    convert(folder, tmp_path / "dense", "--to", "hf-bf16")
    source = BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32)
    dense = HFBitNetForCausalLM.from_pretrained(tmp_path / "dense")
    assert dense.dtype == torch.bfloat16
    for name, layer in _layers(source).items():
        weight = dense.get_submodule(name).weight
        assert type(dense.get_submodule(name)) is torch.nn.Linear
        expected = (unpack_2bit(layer.weight, layer.out_features).float() * layer.weight_scale).to(torch.bfloat16)
        assert torch.equal(weight, expected), name
    assert torch.equal(dense.model.embed_tokens.weight, source.model.embed_tokens.weight.to(torch.bfloat16))


def test_refuses_to_overwrite_without_force(folder: Path, tmp_path: Path):
    target = tmp_path / "model.gguf"
    convert(folder, target, "--to", "gguf")
    before = target.read_bytes()
    result = subprocess.run([sys.executable, "-m", "bitnet158", "convert", str(folder), str(target), "--to", "gguf",
                             "--type", "tq1_0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"error: {target}: already exists (use --force to overwrite it)"]
    assert target.read_bytes() == before
    convert(folder, target, "--to", "gguf", "--type", "tq1_0", "--force")
    assert target.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "src"]  # no temporary files left
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(Exception, match="already exists"):
        CliRunner().invoke(app, ["convert", str(target), str(tmp_path / "out"), "--to", "hf"],
                           catch_exceptions=False)
    convert(target, tmp_path / "out", "--to", "hf", "--force")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
