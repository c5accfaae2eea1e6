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
from bitnet158.training.config import TrainConfig
from bitnet158.training.corpus import BOS, EOS, build_corpus, is_validation
from bitnet158.training.optim import STAGE1_END_RATIO, Schedule
from bitnet158.training.trainer import Trainer, train, use_plain_linears_

pytestmark = pytest.mark.usefixtures("one_torch_thread")

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


def test_schedules_warm_up_then_follow_their_shape() -> None:
    cosine = Schedule("cosine", 1.0, total=110, warmup=10, min_lr_ratio=0.1)
    assert cosine.lr_at(0) == pytest.approx(0.1) and cosine.lr_at(9) == pytest.approx(1.0)
    assert cosine.lr_at(60) == pytest.approx(0.55) and cosine.lr_at(110) == pytest.approx(0.1)
    linear = Schedule("linear", 1.0, total=110, warmup=10, min_lr_ratio=0.1)
    assert linear.lr_at(60) == pytest.approx(0.55) and linear.lr_at(35) == pytest.approx(1 - 0.9 * 0.25)
    constant = Schedule("constant", 1.0, total=110, warmup=10)
    assert constant.lr_at(4) == pytest.approx(0.5) and constant.lr_at(100) == 1.0
    assert cosine.weight_decay_at(100) == 0.1  # constant outside two_stage

    # BitNet b1.58: stage 1 decays from the peak, drops abruptly at the split to 2/3 of it, decays again;
    # weight decay falls from 0.1 to 0 over stage 1 and stays 0 in stage 2.
    two = Schedule("two_stage", 1.5e-3, total=200, warmup=10, min_lr_ratio=0.1, weight_decay=0.1)
    assert two.lr_at(9) == pytest.approx(1.5e-3)
    assert two.lr_at(99) == pytest.approx(1.5e-3 * STAGE1_END_RATIO, rel=1e-3)
    assert two.lr_at(100) == pytest.approx(1e-3)  # the drop
    assert two.lr_at(200) == pytest.approx(1e-4)
    assert two.weight_decay_at(0) == pytest.approx(0.1) and two.weight_decay_at(50) == pytest.approx(0.05)
    assert two.weight_decay_at(100) == 0 and two.weight_decay_at(150) == 0
    lrs = [two.lr_at(s) for s in range(10, 200)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # never rises after warm-up


def _config(data: Path, model_config: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup=5, eval_every=20, device="cpu", seed=0,
                    schedule="cosine", tensorboard=False, log_every=5)
    return TrainConfig(data=[data], model_config=model_config, out=out, **{**settings, **overrides})


def test_training_lowers_the_loss_and_writes_a_loadable_packed_model(
    data: Path, model_config: Path, tmp_path: Path
) -> None:
    metrics = train(_config(data, model_config, tmp_path, tensorboard=True))
    history = metrics["history"]
    assert [h["step"] for h in history] == [0, 20, 40]
    assert history[0]["val_loss"] == pytest.approx(math.log(320), abs=0.3)  # untrained: about uniform
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 1.5
    assert metrics["tokens_trained"] == 40 * 8 * 32

    # Logs: JSONL records for training and validation, TensorBoard event files.
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [r["val_perplexity"] for r in records if "val_loss" in r] == [h["val_perplexity"] for h in history]
    assert all(r["tokens_per_s"] > 0 and r["lambda"] == 1.0 for r in records if "loss" in r)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # The newest checkpoint holds the final master weights: frozen, they give the exported model's logits.
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step_00000020", "step_00000040"]
    state = json.loads((tmp_path / "checkpoints" / "step_00000040" / "state.json").read_text())
    assert state["step"] == 40 and state["tokens"] == 40 * 8 * 32
    config = BitNetConfig.from_json(tmp_path / "config.json")
    trained = BitNetForCausalLM(config)
    master_weights = load_file(tmp_path / "checkpoints" / "step_00000040" / "model.safetensors")
    missing, unexpected = trained.load_state_dict(master_weights, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied to the embedding
    frozen = freeze_(trained).eval()

    loaded = BitNetForCausalLM.from_pretrained(tmp_path)
    inputs = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16)[:64].astype(np.int64)).view(2, 32)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), frozen(inputs))
    assert config.eos_token_ids == [Tokenizer.from_pretrained(tmp_path).eos_token_id, 2]  # <|eot_id|> is 2
    assert (tmp_path / "tokenizer_config.json").read_text() == (data / "tokenizer_config.json").read_text()


def test_keep_last_and_sgd(data: Path, model_config: Path, tmp_path: Path) -> None:
    metrics = train(_config(data, model_config, tmp_path, steps=12, eval_every=4, keep_last=2, optimizer="sgd",
                            lr=0.5, schedule="constant", warmup=0))
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step_00000008", "step_00000012"]
    assert metrics["history"][-1]["val_loss"] < metrics["history"][0]["val_loss"] - 0.5  # SGD trains too


def test_bf16_baseline_trains_the_same_network_unquantized(data: Path, model_config: Path, tmp_path: Path) -> None:
    model = BitNetForCausalLM(BitNetConfig(vocab_size=320, **TINY_MODEL))
    before = dict(model.named_parameters())
    use_plain_linears_(model)
    assert not any(isinstance(module, BitLinear) for module in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert all(param is before[name] for name, param in model.named_parameters())  # same shape, same weights

    metrics = train(_config(data, model_config, tmp_path, precision="bf16", steps=20, eval_every=20))
    assert metrics["history"][-1]["val_loss"] < metrics["history"][0]["val_loss"] - 1.0
    weights = load_file(tmp_path / "checkpoints" / "step_00000020" / "model.safetensors")
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32  # master weights, not packed
    assert not (tmp_path / "config.json").exists()  # not a BitNet checkpoint: from_pretrained would ternarize it


def test_grad_accumulation_matches_one_big_batch(data: Path, model_config: Path, tmp_path: Path) -> None:
    """8 sequences in one micro-batch, or 4 + 4 accumulated: the same step (activation checkpointing on in the
    second, which must not change the numbers either)."""
    params = []
    for name, overrides in (("one", {}), ("accum", {"batch_size": 4, "grad_accum": 2,
                                                    "activation_checkpointing": True})):
        trainer = Trainer(_config(data, model_config, tmp_path / name, steps=1, **overrides))
        record = trainer.train_step()
        params.append(dict(trainer.model.named_parameters()))
        assert record["step"] == 1 and not record["skipped"]
    for name, value in params[0].items():
        torch.testing.assert_close(params[1][name], value, rtol=1e-4, atol=1e-6)


def test_a_step_with_non_finite_gradients_is_skipped_with_a_warning(
    data: Path, model_config: Path, tmp_path: Path
) -> None:
    trainer = Trainer(_config(data, model_config, tmp_path, steps=3))
    weight = trainer.model.model.layers[0].mlp.up_proj.weight
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    hook = weight.register_hook(lambda grad: grad * float("nan"))
    with pytest.warns(UserWarning, match="step 1: gradient norm is nan; step skipped"):
        record = trainer.train_step()
    hook.remove()
    assert record["skipped"] and trainer.step == 1
    assert all(torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())  # nothing moved
    assert not trainer.train_step()["skipped"]
    assert not torch.equal(weight, before["model.layers.0.mlp.up_proj.weight"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_lambda_blends_quantization_in(data: Path, model_config: Path) -> None:
    from bitnet158.quant.fake import fake_quant_activations, fake_quant_ternary

    torch.manual_seed(0)
    w = torch.randn(16, 32, requires_grad=True)
    q = fake_quant_ternary(w.detach())
    for strength in (0.0, 0.25, 1.0):
        blended = fake_quant_ternary(w, torch.tensor(strength))
        torch.testing.assert_close(blended, w.detach() + strength * (q - w.detach()))
        (grad,) = torch.autograd.grad(blended.sum(), w)
        assert torch.equal(grad, torch.ones_like(w))  # straight through at every λ
    x = torch.randn(4, 32)
    assert torch.equal(fake_quant_activations(x, strength=torch.tensor(0.0)), x)

    layer = BitLinear(32, 16)
    assert layer.quant_strength is None and layer.fused is None
    layer.quant_strength = torch.tensor(0.0)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert "quant_strength" not in layer.state_dict()


def test_yaml_config_and_flags(tmp_path: Path, data: Path, model_config: Path) -> None:
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"data: [{data}]\nmodel_config: model.json\nout: out\nsteps: 7\nbetas: [0.8, 0.9]\n"
                         "compile: off\nlr: 1e-3\n")
    cfg = TrainConfig.from_sources(yaml_file, steps=9)
    assert cfg.steps == 9 and cfg.betas == [0.8, 0.9] and cfg.compile == "off" and cfg.lr == 1e-3
    assert cfg.model_config == tmp_path / "model.json" and cfg.out == tmp_path / "out"  # relative to the YAML
    assert cfg.data == [data]

    def error(text: str, **flags) -> str:
        yaml_file.write_text(f"data: [{data}]\nmodel_config: {model_config}\nout: out\n" + text)
        with pytest.raises(UserError) as info:
            TrainConfig.from_sources(yaml_file, **flags)
        return str(info.value)

    assert error("stepz: 3\n") == f"{yaml_file}: unknown field 'stepz' (did you mean steps?)"
    assert error("steps: three\n") == f"{yaml_file}: field 'steps' must be an integer, got 'three'"
    assert error("steps: 0\n") == f"{yaml_file}: --steps must be at least 1, got 0"
    assert error("schedule: wavy\n").endswith("--schedule is 'wavy'; expected one of two_stage, cosine, linear, "
                                              "constant")
    assert error("", lr=-1.0) == f"{yaml_file}: --lr must be positive, got -1.0"
    assert error("steps: [1\n").startswith(f"{yaml_file}: not valid YAML at line")
    with pytest.raises(UserError, match="no such file"):
        TrainConfig.from_sources(tmp_path / "missing.yaml")


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
    with pytest.raises(UserError, match="nowhere.jsonl: no such file or folder"):
        train(_config(tmp_path / "nowhere.jsonl", model_config, tmp_path, tokenizer=data))


def test_cli_reports_a_bad_field_in_one_line(tmp_path: Path, data: Path, model_config: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "run.yaml").write_text(f"data: [{data}]\nmodel_config: {model_config}\nout: out\nwarmup: -3\n")
    result = subprocess.run([sys.executable, "-m", "bitnet158", "train", "--config", str(tmp_path / "run.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    message = f"error: {tmp_path / 'run.yaml'}: --warmup must not be negative, got -3"
    assert result.stderr.strip().splitlines() == [message]
    assert "Traceback" not in result.stdout + result.stderr
