"""Saving and loading Hugging Face style checkpoints, and clear errors for broken ones."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bitnet158 import BitNetForCausalLM, PackedBitLinear, freeze_
from bitnet158.errors import UserError
from bitnet158.packing import pack_2bit, unpack_2bit
from bitnet158.quant import quantize_ternary

Q_PROJ = "model.layers.0.self_attn.q_proj"


def packed_layers(model: BitNetForCausalLM) -> dict[str, PackedBitLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedBitLinear)}


def edit_tensors(file, edit) -> None:
    """Rewrite a safetensors file after `edit(tensors)` changed its dict of tensors in place."""
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, {"format": "pt"})


def edit_config(folder, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture
def saved(make_model, tmp_path):
    """A frozen tiny model and the folder it was saved to."""
    model = freeze_(make_model())
    model.save_pretrained(tmp_path)
    return model, tmp_path


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("frozen", [True, False])
def test_round_trip_is_exact(make_model, tmp_path, tie, frozen):
    model = make_model(tie_word_embeddings=tie)
    if frozen:
        freeze_(model)
    model.save_pretrained(tmp_path)
    loaded = BitNetForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    reference = model if frozen else freeze_(model)

    assert loaded.config == reference.config
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "model.safetensors.index.json").exists()
    expected_state, loaded_state = reference.state_dict(), loaded.state_dict()
    assert expected_state.keys() == loaded_state.keys()
    for name, tensor in expected_state.items():
        assert loaded_state[name].dtype == tensor.dtype, name
        assert torch.equal(loaded_state[name], tensor), name
    ids = torch.randint(0, 211, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), reference(ids))


def test_saved_file_layout(make_model, tmp_path):
    model, folder = freeze_(make_model(tie_word_embeddings=True)), tmp_path
    model.save_pretrained(folder)
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        q_proj, q_scale = f.get_tensor(f"{Q_PROJ}.weight"), f.get_tensor(f"{Q_PROJ}.weight_scale")
    # 7 packed linears with their scales per layer, 4 norms per layer, embeddings and final norm; lm_head is tied
    assert len(names) == 2 * (7 * 2 + 4) + 2
    assert "lm_head.weight" not in names
    assert q_proj.dtype == torch.uint8 and q_proj.shape == (16, 64)
    # the autobitlinear convention: weight_scale is s = mean|W|, as in Microsoft's checkpoint
    assert torch.equal(q_scale, packed_layers(model)[Q_PROJ].weight_scale)
    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quantization["linear_class"] == "autobitlinear" and quantization["quantization_mode"] == "offline"


def test_saves_high_precision_tensors_in_config_dtype(make_model, tmp_path):
    model = freeze_(make_model(torch_dtype="bfloat16"))
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
        assert f.get_slice(f"{Q_PROJ}.weight").get_dtype() == "U8"
    loaded = BitNetForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.dtype == torch.float32
    expected = model.model.embed_tokens.weight.bfloat16().float()
    assert torch.equal(loaded.model.embed_tokens.weight, expected)


def test_sharded_save_writes_an_index_and_loads(make_model, tmp_path):
    model = freeze_(make_model(tie_word_embeddings=False))
    limit = 20_000
    model.save_pretrained(tmp_path, max_shard_bytes=limit)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    stored = {}
    for shard in shards:
        tensors = load_file(shard)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= limit or len(tensors) == 1  # only a single tensor larger than the limit may exceed it
        stored.update(dict.fromkeys(tensors, shard.name))
    assert stored == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for s in shards for t in load_file(s).values()
    )
    assert not (tmp_path / "model.safetensors").exists()

    loaded = BitNetForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 211, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


@pytest.mark.parametrize("tie", [True, False])
def test_master_weights_are_quantized_on_load(make_model, tmp_path, tie):
    model = make_model(tie_word_embeddings=tie)
    state = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))

    loaded = BitNetForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for name, layer in packed_layers(loaded).items():
        quantized = quantize_ternary(state[f"{name}.weight"])
        assert torch.equal(layer.weight, pack_2bit(quantized.codes)), name
        assert torch.equal(layer.weight_scale, quantized.scale), name
    ids = torch.randint(0, 211, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids), freeze_(model)(ids))


def test_bitlinear_class_stores_inverse_scale(saved):
    """With `linear_class: bitlinear` transformers divides by weight_scale, so the file holds 1 / s."""
    model, folder = saved
    edit_config(folder, lambda c: c["quantization_config"].update(linear_class="bitlinear"))

    def invert_scales(tensors):
        for name in list(tensors):
            if name.endswith(".weight_scale"):
                tensors[name] = 1 / tensors[name]

    edit_tensors(folder / "model.safetensors", invert_scales)
    loaded = BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for name, layer in packed_layers(loaded).items():
        torch.testing.assert_close(layer.weight_scale, packed_layers(model)[name].weight_scale, rtol=1e-6, atol=0)


def test_bfloat16_weight_scale_loads(saved):
    """Microsoft's checkpoint stores each weight_scale as one bf16 number."""
    model, folder = saved

    def to_bfloat16(tensors):
        for name in list(tensors):
            if name.endswith(".weight_scale"):
                tensors[name] = tensors[name].bfloat16()

    edit_tensors(folder / "model.safetensors", to_bfloat16)
    loaded = BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for name, layer in packed_layers(loaded).items():
        assert layer.weight_scale.dtype == torch.float32
        assert torch.equal(layer.weight_scale, packed_layers(model)[name].weight_scale.bfloat16().float()), name


def test_unpacked_ternary_weights_with_scale_load(saved):
    """transformers keeps offline autobitlinear weights as float {-1, 0, 1} tensors next to their scale."""
    model, folder = saved

    def unpack(tensors):
        for name, layer in packed_layers(model).items():
            tensors[f"{name}.weight"] = unpack_2bit(layer.weight, layer.out_features).float()

    edit_tensors(folder / "model.safetensors", unpack)
    loaded = BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for name, layer in packed_layers(loaded).items():
        assert torch.equal(layer.weight, packed_layers(model)[name].weight), name
        assert torch.equal(layer.weight_scale, packed_layers(model)[name].weight_scale), name


# --- broken input: a UserError whose one line names the file and the tensor or field ---


def load_error(folder) -> str:
    with pytest.raises(UserError) as err:
        BitNetForCausalLM.from_pretrained(folder)
    message = str(err.value)
    assert "\n" not in message
    return message


def cut_inside_header(data: bytes) -> bytes:
    header_length = struct.unpack("<Q", data[:8])[0]  # safetensors: u64 header length, JSON header, data
    return data[: 8 + header_length // 2]


@pytest.mark.parametrize(
    "corrupt, detail",
    [
        (lambda data: data[: len(data) // 2], "file not fully covered"),
        (cut_inside_header, "header"),
        (lambda data: bytes(range(256)) * 4, "header"),
        (lambda data: b"", "header too small"),
    ],
    ids=["cut-in-half", "cut-inside-header", "garbage", "empty"],
)
def test_corrupt_safetensors(saved, corrupt, detail):
    _, folder = saved
    file = folder / "model.safetensors"
    file.write_bytes(corrupt(file.read_bytes()))
    message = load_error(folder)
    assert message.startswith(f"{file}: not a valid safetensors file")
    assert detail in message


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "num_attention_heads"])
def test_config_missing_field(saved, field):
    _, folder = saved
    edit_config(folder, lambda c: c.pop(field))
    assert load_error(folder) == f"{folder / 'config.json'}: missing field '{field}'"


@pytest.mark.parametrize(
    "field, value, detail",
    [
        ("num_hidden_layers", 0, "field 'num_hidden_layers' must be a positive integer, got 0"),
        ("hidden_size", "64", "field 'hidden_size' must be a positive integer, got '64'"),
        ("hidden_act", "gelu", "field 'hidden_act' is 'gelu'"),
        ("num_key_value_heads", 3, "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
        ("rms_norm_eps", "1e-5", "field 'rms_norm_eps' must be a positive number, got '1e-5'"),
        ("rope_parameters", {"rope_theta": -1.0}, "field 'rope_theta' must be a positive number, got -1.0"),
        ("rope_parameters", 5, "field 'rope_parameters' must be an object, got 5"),
        ("tie_word_embeddings", "false", "field 'tie_word_embeddings' must be true or false, got 'false'"),
        ("quantization_config", "bitnet", "field 'quantization_config' must be an object, got 'bitnet'"),
        ("quantization_config", {"linear_class": "ternary"}, "linear_class 'ternary' is not one of"),
    ],
)
def test_config_bad_value(saved, field, value, detail):
    _, folder = saved
    edit_config(folder, lambda c: c.update({field: value}))
    message = load_error(folder)
    assert message.startswith(f"{folder / 'config.json'}: ")
    assert detail in message


def test_config_not_json(saved):
    _, folder = saved
    (folder / "config.json").write_text('{"vocab_size": 211,')
    assert load_error(folder).startswith(f"{folder / 'config.json'}: not valid JSON")


def test_missing_folder_and_missing_weights(make_model, tmp_path):
    assert load_error(tmp_path / "nowhere") == f"{tmp_path / 'nowhere'}: no such model folder"
    assert load_error(tmp_path) == f"{tmp_path / 'config.json'}: no such file"
    (tmp_path / "config.json").write_text(json.dumps(make_model().config.to_dict()))
    assert load_error(tmp_path) == f"{tmp_path}: no model.safetensors or model.safetensors.index.json"


def test_missing_shard(make_model, tmp_path):
    freeze_(make_model()).save_pretrained(tmp_path, max_shard_bytes=20_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    shards[1].unlink()
    index = tmp_path / "model.safetensors.index.json"
    assert load_error(tmp_path) == f"{index}: shard '{shards[1].name}' is missing"


@pytest.mark.parametrize("shard", ["/etc/hostname", "../model-00001-of-00003.safetensors", 5])
def test_index_names_a_shard_outside_the_folder(make_model, tmp_path, shard):
    freeze_(make_model()).save_pretrained(tmp_path, max_shard_bytes=20_000)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": shard}}))
    assert load_error(tmp_path) == f"{index}: shard {shard!r} is not a file name in {tmp_path}"


def test_index_not_json(make_model, tmp_path):
    freeze_(make_model()).save_pretrained(tmp_path, max_shard_bytes=20_000)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("weight_map")
    assert load_error(tmp_path).startswith(f"{index}: not a valid safetensors index")


def test_missing_tensor(saved):
    _, folder = saved
    edit_tensors(folder / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    assert load_error(folder) == f"{folder}: checkpoint has no tensor 'model.layers.1.mlp.down_proj.weight'"


@pytest.mark.parametrize(
    "name, bad, detail",
    [
        ("model.norm.weight", torch.ones(63), "tensor 'model.norm.weight' has shape (63,), expected (64,)"),
        ("model.embed_tokens.weight", torch.ones(64, 211), "has shape (64, 211), expected (211, 64)"),
        (f"{Q_PROJ}.weight", torch.zeros(15, 64, dtype=torch.uint8), "has shape (15, 64), expected packed (16, 64)"),
        (f"{Q_PROJ}.weight", torch.zeros(64, 63), "has shape (64, 63), expected (64, 64)"),
        (f"{Q_PROJ}.weight", torch.zeros(16, 64, dtype=torch.int32), "unsupported dtype torch.int32"),
        (f"{Q_PROJ}.weight", torch.full((64, 64), 0.5), "has a weight_scale but values outside {-1, 0, 1}"),
        ("model.norm.weight", torch.ones(64, dtype=torch.int64), "'model.norm.weight' has dtype torch.int64"),
    ],
)
def test_wrong_tensor(saved, name, bad, detail):
    _, folder = saved
    edit_tensors(folder / "model.safetensors", lambda t: t.update({name: bad}))
    message = load_error(folder)
    assert message.startswith(f"{folder / 'model.safetensors'}: tensor '{name}' ")
    assert detail in message


@pytest.mark.parametrize("scale", [float("nan"), 0.0, -0.5, float("inf")])
def test_bad_weight_scale(saved, scale):
    _, folder = saved
    edit_tensors(folder / "model.safetensors", lambda t: t.update({f"{Q_PROJ}.weight_scale": torch.tensor([scale])}))
    assert load_error(folder) == (
        f"{folder / 'model.safetensors'}: tensor '{Q_PROJ}.weight_scale' must be one positive finite number, "
        f"got [{scale}]"
    )


def test_weight_scale_with_several_values(saved):
    _, folder = saved
    edit_tensors(folder / "model.safetensors", lambda t: t.update({f"{Q_PROJ}.weight_scale": torch.ones(2)}))
    assert f"tensor '{Q_PROJ}.weight_scale' must be one positive finite number" in load_error(folder)


def test_packed_weight_without_scale(saved):
    _, folder = saved
    edit_tensors(folder / "model.safetensors", lambda t: t.pop(f"{Q_PROJ}.weight_scale"))
    assert load_error(folder) == (
        f"{folder / 'model.safetensors'}: packed tensor '{Q_PROJ}.weight' has no '{Q_PROJ}.weight_scale'"
    )


def test_master_weight_with_nan(make_model, tmp_path):
    model = make_model()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state[f"{Q_PROJ}.weight"][3, 5] = float("nan")
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    assert load_error(tmp_path) == (
        f"{tmp_path / 'model.safetensors'}: tensor '{Q_PROJ}.weight' holds NaN or infinite values"
    )
