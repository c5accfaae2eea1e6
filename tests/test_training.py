"""The corpus builder and the trainer, on a tiny generated corpus and a tiny model, on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer

from bitnet158 import BitLinear, BitNetConfig, BitNetForCausalLM, freeze_
from bitnet158.errors import UserError
from bitnet158.tokenizer import Tokenizer
from bitnet158.training.corpus import BOS, EOS, build_corpus, is_validation
from bitnet158.training.trainer import TrainConfig, learning_rate, train, use_plain_linears_

TINY_MODEL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def _module(i: int) -> str:
    return (
        f'"""Module number {i}."""\n\n\n'
        f"def scale_{i}(values):\n    return [value * {i % 7 + 2} for value in values]\n\n\n"
        f"class Counter{i}:\n    def __init__(self):\n        self.count = {i}\n\n"
        f"    def increment(self):\n        self.count += 1\n        return self.count\n"
    )


@pytest.fixture(scope="module")
def source_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 small modules, plus files the corpus must leave out."""
    root = tmp_path_factory.mktemp("stdlib")
    for i in range(40):
        folder = root / ("pkg" if i % 3 else "") / ("test" if i % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"mod_{i}.py").write_text(_module(i))
    (root / "site-packages").mkdir()
    (root / "site-packages" / "third_party.py").write_text("x = 1\n")
    (root / "py2.py").write_text("print 'hello'\n")
    (root / "latin1.py").write_bytes(b"# -*- coding: latin-1 -*-\ns = '\xe9'\n")
    return root


@pytest.fixture(scope="module")
def data(source_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    build_corpus(out, root=source_root, vocab_size=320, val_percent=20)
    return out


@pytest.fixture(scope="module")
def model_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "model.json"
    path.write_text(json.dumps(TINY_MODEL))
    return path


def _files(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("mod_*.py")}


def test_corpus_split_is_deterministic_disjoint_and_complete(source_root: Path, data: Path, tmp_path: Path) -> None:
    manifest = json.loads((data / "corpus.json").read_text())
    again = build_corpus(tmp_path, root=source_root, vocab_size=320, val_percent=20)
    val = set(manifest["val_files"])
    assert again["val_files"] == manifest["val_files"]
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / name).read_bytes() == (data / name).read_bytes()
    # Held out by path alone: the same files whatever else is in the corpus.
    assert val == {name for name in _files(source_root) if is_validation(name, 20)}
    assert 0 < len(val) < 40
    assert manifest["train"]["files"] + manifest["val"]["files"] == 40  # the left-out files are not counted

    # val.bin is exactly the held-out files, each between <|begin_of_text|> and <|end_of_text|>.
    tokenizer = HFTokenizer.from_file(str(data / "tokenizer.json"))
    text = tokenizer.decode(np.fromfile(data / "val.bin", dtype=np.uint16).tolist(), skip_special_tokens=False)
    expected = "".join(f"{BOS}{(source_root / name).read_text()}{EOS}" for name in sorted(val))
    assert text == expected
    train_text = tokenizer.decode(np.fromfile(data / "train.bin", dtype=np.uint16).tolist(), skip_special_tokens=False)
    assert train_text.count(BOS) == manifest["train"]["files"] == 40 - len(val)
    assert "third_party" not in train_text and "print 'hello'" not in train_text and "coding: latin-1" not in train_text


def test_tokenizer_files_work_with_the_package_tokenizer(data: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(data)
    ids = tokenizer.encode("def f(x):\n    return x\n")
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids) == "def f(x):\n    return x\n"
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert tokenizer.apply_chat_template(messages) == (
        "<|begin_of_text|>User: Hi<|eot_id|>Assistant: Hello.<|eot_id|>User: Bye<|eot_id|>Assistant: "
    )


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    assert learning_rate(0, 1.0, warmup=10, total=110) == pytest.approx(0.1)
    assert learning_rate(9, 1.0, warmup=10, total=110) == pytest.approx(1.0)
    assert learning_rate(60, 1.0, warmup=10, total=110) == pytest.approx(0.55)
    assert learning_rate(110, 1.0, warmup=10, total=110) == pytest.approx(0.1)


def _config(data: Path, model_config: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup=5, eval_every=20, device="cpu", seed=0)
    return TrainConfig(data, model_config, out, **{**settings, **overrides})


def test_training_lowers_the_loss_and_writes_a_loadable_packed_model(
    data: Path, model_config: Path, tmp_path: Path
) -> None:
    metrics = train(_config(data, model_config, tmp_path))
    history = metrics["history"]
    assert [h["step"] for h in history] == [0, 20, 40]
    assert history[0]["val_loss"] == pytest.approx(math.log(320), abs=0.3)  # untrained: about uniform
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 1.5
    assert metrics["tokens_trained"] == 40 * 8 * 32

    # The checkpoint holds the final master weights: frozen, they must give the saved model's logits.
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 40 and state["val_loss"] == history[-1]["val_loss"]
    torch.load(tmp_path / "checkpoint" / "optimizer.pt", weights_only=True)
    config = BitNetConfig.from_json(tmp_path / "config.json")
    trained = BitNetForCausalLM(config)
    master_weights = load_file(tmp_path / "checkpoint" / "model.safetensors")
    missing, unexpected = trained.load_state_dict(master_weights, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied to the embedding
    frozen = freeze_(trained).eval()

    loaded = BitNetForCausalLM.from_pretrained(tmp_path)
    inputs = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16)[:64].astype(np.int64)).view(2, 32)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), frozen(inputs))
    assert config.eos_token_ids == [Tokenizer.from_pretrained(tmp_path).eos_token_id, 2]  # <|eot_id|> is 2
    assert (tmp_path / "tokenizer_config.json").read_text() == (data / "tokenizer_config.json").read_text()


def test_bf16_baseline_trains_the_same_network_unquantized(data: Path, model_config: Path, tmp_path: Path) -> None:
    model = BitNetForCausalLM(BitNetConfig(vocab_size=320, **TINY_MODEL))
    before = dict(model.named_parameters())
    use_plain_linears_(model)
    assert not any(isinstance(module, BitLinear) for module in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert all(param is before[name] for name, param in model.named_parameters())  # same shape, same weights

    metrics = train(_config(data, model_config, tmp_path, precision="bf16", steps=20, eval_every=20))
    assert metrics["history"][-1]["val_loss"] < metrics["history"][0]["val_loss"] - 1.0
    weights = load_file(tmp_path / "checkpoint" / "model.safetensors")
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32  # master weights, not packed
    assert not (tmp_path / "config.json").exists()  # not a BitNet checkpoint: from_pretrained would ternarize it


def test_bad_inputs_are_user_errors(data: Path, model_config: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--precision"):
        _config(data, model_config, tmp_path, precision="fp8")
    with pytest.raises(UserError, match="--steps"):
        _config(data, model_config, tmp_path, steps=0)
    with pytest.raises(UserError, match="tokenizer.json"):
        train(_config(tmp_path, model_config, tmp_path))
    wrong_vocab = tmp_path / "wrong.json"
    wrong_vocab.write_text(json.dumps({**TINY_MODEL, "vocab_size": 1000}))
    with pytest.raises(UserError, match="vocab_size 1000 differs"):
        train(_config(data, wrong_vocab, tmp_path))
    with pytest.raises(UserError, match="max_position_embeddings 64 < --seq-len 128"):
        train(_config(data, model_config, tmp_path, seq_len=128))
