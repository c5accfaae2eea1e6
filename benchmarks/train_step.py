"""Training step time of a ~125M-parameter model on one GPU: bf16 `nn.Linear` vs BitNet b1.58 QAT.

    python benchmarks/train_step.py [--batch 16] [--seq-len 1024] [--steps 20] [--variants bf16,qat_fused]

Three variants of the same network (12 layers, hidden 768, 12 heads, MLP 2048, vocab 50304, tied embeddings:
about 124M parameters), each a full optimizer step (forward, backward, AdamW) under bf16 autocast and
torch.compile, as `bitnet158 train` runs on CUDA:
- `bf16`: plain `nn.Linear` layers (the baseline);
- `qat_reference`: `BitLinear` with PyTorch fake quantization (what runs without Triton);
- `qat_fused`: `BitLinear` with the fused Triton kernels (bitnet158.training.triton_bitlinear).
Reported: median step time, tokens/s, MFU (model FLOPs 6·N + 12·L·d·T per token, against the GPU's dense bf16
peak) and the ratio of each QAT step to the bf16 step (target: at most 1.2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bitnet158.model import BitNetConfig, BitNetForCausalLM
from bitnet158.nn import BitLinear
from bitnet158.training.optim import make_optimizer
from bitnet158.training.trainer import next_token_loss, use_plain_linears_

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense tensor-core FLOP/s (SXM)


def model_config(seq_len: int) -> BitNetConfig:
    return BitNetConfig(vocab_size=50304, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=seq_len,
                        tie_word_embeddings=True, hidden_act="relu2")  # fmt: skip


def flops_per_token(config: BitNetConfig, seq_len: int) -> float:
    """6·N (N: every matmul weight, the tied lm_head counted once as a matmul) + 12·L·d·T for attention."""
    layer = 4 * config.hidden_size**2 + 3 * config.hidden_size * config.intermediate_size
    n = config.num_hidden_layers * layer + config.vocab_size * config.hidden_size
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def run(variant: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    config = model_config(args.seq_len)
    model = BitNetForCausalLM(config)
    model.init_weights(0.02)
    if variant == "bf16":
        use_plain_linears_(model)
    model.cuda()
    if variant == "qat_fused":
        from bitnet158.training.triton_bitlinear import bitlinear_train

        for module in model.modules():
            if isinstance(module, BitLinear):
                module.fused = bitlinear_train
    optimizer = make_optimizer(model, "adamw", 1e-3, 0.1, fused=True)
    loss_fn = torch.compile(next_token_loss)
    tokens = torch.randint(config.vocab_size, (args.batch, args.seq_len + 1), device="cuda")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):  # compilation and autotuning
        step()
    torch.cuda.synchronize()
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_step = args.batch * args.seq_len
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    tps = tokens_per_step / seconds
    result = {
        "variant": variant,
        "step_ms": seconds * 1e3,
        "tokens_per_s": tps,
        "mfu": tps * flops_per_token(config, args.seq_len) / peak if peak else None,
        "loss_last": losses[-1].item(),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", default="bf16,qat_reference,qat_fused")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step.json"))
    args = parser.parse_args()
    config = model_config(args.seq_len)
    results = {}
    for variant in args.variants.split(","):
        try:
            results[variant] = run(variant, args)
        except Exception as err:  # report the other variants even if one fails
            print(f"{variant} failed: {type(err).__name__}: {err}", flush=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = results.get("bf16", {}).get("step_ms")
    for result in results.values():
        result["ratio_to_bf16"] = result["step_ms"] / base if base else None
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "parameters": config.num_parameters(),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens_per_step": args.batch * args.seq_len,
        "flops_per_token": flops_per_token(config, args.seq_len),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: round(v["ratio_to_bf16"], 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
