"""The BitNet papers' scaling trend at small scale: ternary (QAT) vs bf16 models of 3 sizes, equal tokens.

    python scripts/build_embedded_model.py corpus        # runs/stdlib, if missing
    python benchmarks/train_scaling.py [--steps 500] [--out benchmarks/results/train_scaling.json]

Each size is trained twice on the stdlib corpus with the same data order, seed, schedule and token budget
(`--steps` x 32 x 512 tokens): once with BitLinear QAT, once with plain bf16 linears. Reported: the final
validation loss and perplexity of each, and the ternary/bf16 perplexity ratio, which the papers find
shrinking as models grow.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bitnet158.training.config import TrainConfig
from bitnet158.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
SIZES = {  # name: (hidden, layers, heads, intermediate)
    "S": (256, 4, 4, 640),
    "M": (384, 6, 6, 1024),
    "L": (512, 8, 8, 1280),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "stdlib")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "scaling")
    parser.add_argument("--fused-kernels", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_scaling.json")
    args = parser.parse_args()
    rows = []
    for name, (hidden, layers, heads, intermediate) in SIZES.items():
        config_path = args.runs / f"{name}.json"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps({
            "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": 512,
            "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        }))  # fmt: skip
        row = {"size": name, "hidden": hidden, "layers": layers}
        for precision in ("ternary", "bf16"):
            cfg = TrainConfig(
                data=[args.data], model_config=config_path, out=args.runs / f"{name}-{precision}",
                precision=precision, steps=args.steps, batch_size=32, seq_len=512, lr=1.5e-3, warmup=50,
                schedule="cosine", eval_every=args.steps, log_every=50, tensorboard=False, progress="off",
                compile="off", fused_kernels=args.fused_kernels, seed=0,
            )  # fmt: skip
            metrics = Trainer(cfg).fit()
            counts = metrics["parameters"]
            row["parameters"] = counts["ternary"] + counts["high_precision"]
            row["tokens"] = metrics["tokens_trained"]
            row[f"{precision}_val_loss"] = metrics["val_loss"]
            row[f"{precision}_val_ppl"] = metrics["val_perplexity"]
            row[f"{precision}_seconds"] = metrics["seconds"]
            print(json.dumps(row), flush=True)
        row["ppl_ratio"] = row["ternary_val_ppl"] / row["bf16_val_ppl"]
        rows.append(row)
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| size | params | tokens | ternary ppl | bf16 ppl | ratio |")
    for r in rows:
        print(f"| {r['size']} | {r['parameters'] / 1e6:.1f}M | {r['tokens'] / 1e6:.1f}M | {r['ternary_val_ppl']:.3f} | "
              f"{r['bf16_val_ppl']:.3f} | {r['ppl_ratio']:.3f} |")


if __name__ == "__main__":
    main()
