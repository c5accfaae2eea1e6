"""Converting tiny random Hugging Face Llama, Qwen2 and Mistral checkpoints into BitNet models, and training them
with the λ warm-up; reading every data format into packed token files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_tokenizer import write_tokenizer_folder
from torch import nn

from bitnet158 import BitLinear, BitNetForCausalLM
from bitnet158.errors import UserError
from bitnet158.tokenizer import Tokenizer
from bitnet158.training.config import TrainConfig
from bitnet158.training.data import DocumentReader, PackedSequences, expand_paths, prepare_tokens
from bitnet158.training.from_hf import calibrate_sub_norms_, load_hf_llama, set_quant_strength_
from bitnet158.training.trainer import Trainer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_folder(tmp_path_factory.mktemp("tokenizer"))


def _hf_checkpoint(kind: str, folder: Path, tokenizer_dir: Path) -> nn.Module:
    vocab = Tokenizer.from_pretrained(tokenizer_dir).vocab_size
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    torch.manual_seed(0)
    config = config_class(vocab_size=vocab, tie_word_embeddings=kind == "qwen2", **SHAPE)
    model = model_class(config).eval()
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_conversion_keeps_the_network_and_adds_bitnet_layers(kind: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    hf = _hf_checkpoint(kind, tmp_path, tokenizer_dir)
    if kind == "qwen2":
        with pytest.warns(UserWarning, match="tensors not in BitNet dropped"):
            model = load_hf_llama(tmp_path)
        with torch.no_grad():  # our network has no q/k/v biases: compare with them zeroed in the original
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.zero_()
    else:
        model = load_hf_llama(tmp_path)
    linears = {name for name, m in model.named_modules() if isinstance(m, BitLinear)}
    assert len(linears) == 7 * SHAPE["num_hidden_layers"] and "lm_head" not in linears
    assert type(model.lm_head) is nn.Linear  # high precision
    assert model.config.hidden_act == "silu" and model.config.tie_word_embeddings == (kind == "qwen2")
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, BitLinear))

    ids = torch.randint(model.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = hf(ids).logits
        # λ = 0 and sub-norms off: exactly the original network.
        set_quant_strength_(model, 0.0)
        norms = {n: m for n, m in model.named_modules() if n.endswith("sub_norm")}
        assert len(norms) == 2 * SHAPE["num_hidden_layers"]
        for name in norms:
            model.set_submodule(name, nn.Identity())
        torch.testing.assert_close(model(ids), expected, rtol=1e-4, atol=1e-4)
        for name, norm in norms.items():
            model.set_submodule(name, norm)
        # Sub-norms with calibrated gains: close to the original; with gains of 1 it would be far.
        gains = calibrate_sub_norms_(model, ids)
        assert all(g > 0 for g in gains.values()) and model.model.layers[0].mlp.ffn_sub_norm.weight[0] != 1
        calibrated = (model(ids) - expected).abs().mean()
        for norm in norms.values():
            norm.weight.fill_(1.0)
        assert calibrated < 0.5 * (model(ids) - expected).abs().mean()
        set_quant_strength_(model, None)
        quantized = model(ids)
    assert not torch.allclose(quantized, expected, atol=1e-3)  # λ = 1 changes it


def test_convert_then_train_with_lambda_warmup_and_export(tmp_path: Path, tokenizer_dir: Path) -> None:
    _hf_checkpoint("llama", tmp_path / "llama", tokenizer_dir)
    text = tmp_path / "train.txt"
    sentences = [line for line in Tokenizer.from_pretrained(tokenizer_dir).decode(list(range(60, 120))).split(" ")]
    text.write_text("\n\n".join(" ".join(sentences[i:] + sentences[:i]) for i in range(200)))
    cfg = TrainConfig(data=[text], init_from=tmp_path / "llama", out=tmp_path / "out", steps=12, batch_size=4,
                      seq_len=16, lr=2e-3, warmup=2, lambda_warmup=8, eval_every=6, val_percent=10, device="cpu",
                      tensorboard=False, log_every=1)  # fmt: skip
    metrics = Trainer(cfg).fit()
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    lambdas = [r["lambda"] for r in records if "loss" in r]
    assert lambdas == pytest.approx([0, 1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8, 1, 1, 1, 1])
    assert metrics["history"][-1]["val_loss"] < metrics["history"][0]["val_loss"]
    exported = BitNetForCausalLM.from_pretrained(tmp_path / "out")
    assert exported.config.hidden_act == "silu"
    assert exported.config.vocab_size == Tokenizer.from_pretrained(tokenizer_dir).vocab_size
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_unsupported_checkpoints_are_user_errors(tmp_path: Path, tokenizer_dir: Path) -> None:
    _hf_checkpoint("llama", tmp_path, tokenizer_dir)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "llama3"}}))
    with pytest.raises(UserError, match="rope_scaling 'llama3' is not supported"):
        load_hf_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
        load_hf_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model.safetensors"):
        load_hf_llama(tmp_path)


# --- data formats ------------------------------------------------------------------------------------------------


def test_every_format_reads_the_same_documents(tmp_path: Path, tokenizer_dir: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    docs = [f"document {i}: the quick brown fox, line one.\nline two of {i}" for i in range(6)]
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}]
    (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs)
                                      + json.dumps({"messages": chat}) + "\n")  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps([{"text": d, "id": i} for i, d in enumerate(docs)]))
    with open(tmp_path / "a.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "text", "messages"])
        writer.writerows([[i, d, ""] for i, d in enumerate(docs)] + [[9, "", json.dumps(chat)]])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs + [None], "messages": [None] * 6 + [chat]}), tmp_path / "a.parquet",
                   row_group_size=2)  # fmt: skip

    reader = DocumentReader(tokenizer, "text", "messages", "paragraph")
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=False)
    assert rendered.startswith("<|begin_of_text|>User: Hi there<|eot_id|>")
    for name, expected in (("a.txt", docs), ("a.json", docs), ("a.jsonl", [*docs, rendered]),
                           ("a.csv", [*docs, rendered]), ("a.parquet", [*docs, rendered])):  # fmt: skip
        assert list(reader.documents(tmp_path / name)) == expected, name
    assert [d for d in DocumentReader(tokenizer, "text", "messages", "line").documents(tmp_path / "a.txt")] == [
        line for d in docs for line in d.split("\n")]  # fmt: skip
    assert expand_paths([tmp_path]) == sorted(tmp_path.glob("a.*"))

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "b.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(UserError, match=r"b.jsonl:2: no 'text' or 'messages' field"):
        list(reader.documents(bad / "b.jsonl"))
    (bad / "c.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(UserError, match=r"c.jsonl:2: not valid JSON"):
        list(reader.documents(bad / "c.jsonl"))
    (bad / "d.csv").write_text("id,body\n1,hello\n")
    with pytest.raises(UserError, match=r"d.csv: no column 'text' or 'messages'"):
        list(reader.documents(bad / "d.csv"))


def test_prepare_tokens_packs_holds_out_and_streams(tmp_path: Path, tokenizer_dir: Path, monkeypatch) -> None:
    import bitnet158.training.data as data

    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    reader = DocumentReader(tokenizer, "text", "messages", "line")
    source = tmp_path / "big.txt"
    lines = [f"line number {i} says {'abc' * (i % 7)}" for i in range(3000)]
    source.write_text("\n".join(lines))
    monkeypatch.setattr(data, "FLUSH_TOKENS", 1000)  # many small appends, as a file larger than memory makes
    monkeypatch.setattr(data, "ENCODE_BATCH", 64)
    manifest = prepare_tokens(tmp_path / "cache", [source], [], 10.0, tokenizer, reader, log=lambda _: None)

    held_out = [data.is_held_out("big.txt", i, 10.0) for i in range(len(lines))]
    assert manifest["documents"] == {"train": held_out.count(False), "val": held_out.count(True)}
    assert 200 < manifest["documents"]["val"] < 400
    tokens = {s: np.fromfile(tmp_path / "cache" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")}
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    expected_val = [t for line, out in zip(lines, held_out, strict=True) if out
                    for t in (bos, *tokenizer.encode(line, add_bos=False), eos)]  # fmt: skip
    assert tokens["val"].tolist() == expected_val
    assert (tokens["train"] == bos).sum() == held_out.count(False)
    assert len(tokens["train"]) == manifest["tokens"]["train"]

    # Unchanged inputs: the files are reused; a changed setting tokenizes again.
    stamp = (tmp_path / "cache" / "train.bin").stat().st_mtime_ns
    prepare_tokens(tmp_path / "cache", [source], [], 10.0, tokenizer, reader, log=lambda _: None)
    assert (tmp_path / "cache" / "train.bin").stat().st_mtime_ns == stamp
    again = prepare_tokens(tmp_path / "cache", [source], [], 20.0, tokenizer, reader, log=lambda _: None)
    assert again["documents"]["val"] > manifest["documents"]["val"]

    # Packing: windows of seq_len + 1 tokens, every window once per epoch, in a seeded order.
    packed = PackedSequences(tokens["train"], seq_len=16, seed=3)
    epoch = [packed.sample(k).tolist() for k in range(packed.num_windows)]
    assert sorted(map(tuple, epoch)) == sorted(tuple(packed.window(i).tolist()) for i in range(packed.num_windows))
    assert all(len(w) == 17 for w in epoch)
    assert epoch == [PackedSequences(tokens["train"], 16, 3).sample(k).tolist() for k in range(packed.num_windows)]
    assert epoch != [PackedSequences(tokens["train"], 16, 4).sample(k).tolist() for k in range(packed.num_windows)]
