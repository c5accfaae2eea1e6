"""End-to-end decode on the GPU: the 2B4T architecture with random ternary weights against the same
engine running dense bf16 weights of the same shape.

Batch 1, a 128-token random prompt, 256 new tokens, greedy, through `generate_tokens` (the path the
CLI and the Python API take on a GPU: prefill, then the CUDA-graph decode step). Two warm-up
generations per model (Triton compiles, the decode step is captured, then the prefill at its length's
second use), then REPEATS timed ones; the table
shows medians. Decode tokens/s counts the 255 tokens after the first over the time after the first;
the end-to-end figure includes the prefill. The step alone is also timed with CUDA events over graph
replays (no host work at all).

    python benchmarks/gpu_decode.py [OUTPUT_JSON]     (default benchmarks/results/gpu_decode.json)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
from torch import nn

from bitnet158 import BitNetConfig, BitNetForCausalLM, PackedBitLinear, freeze_
from bitnet158.generation import SamplingParams
from bitnet158.generation.generate import generate_tokens

CONFIG = Path(__file__).resolve().parents[2] / "shared" / "reference" / "bitnet-b1.58-2B-4T.config.json"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "gpu_decode.json"
PROMPT, NEW_TOKENS, REPEATS = 128, 256, 3


@torch.no_grad()
def random_model(ternary: bool) -> BitNetForCausalLM:
    """The 2B4T architecture on the GPU in bf16: random packed ternary linears, or dense bf16 `nn.Linear`s."""
    config = BitNetConfig.from_json(CONFIG)
    with torch.device("meta"):
        model = BitNetForCausalLM(config)
    if ternary:
        model = freeze_(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, PackedBitLinear):
                fields = torch.randint(0, 3, (4, *child.weight.shape), dtype=torch.uint8, device="cuda")
                child.weight = fields[0] | fields[1] << 2 | fields[2] << 4 | fields[3] << 6
                child.weight_scale = torch.rand(1, device="cuda") + 0.5
            elif isinstance(child, nn.Linear) and not (name == "" and child_name == "lm_head"):
                dense = nn.Linear(child.in_features, child.out_features, bias=False, device="cuda",
                                  dtype=torch.bfloat16)
                nn.init.normal_(dense.weight, std=child.in_features**-0.5)
                setattr(module, child_name, dense.requires_grad_(False))
    for name, param in list(model.named_parameters()):
        if param.device.type == "meta":
            module_name, _, attr = name.rpartition(".")
            value = (torch.randn(param.shape, device="cuda") * 0.02 if param.dim() == 2 else torch.ones(param.shape))
            setattr(model.get_submodule(module_name), attr,
                    nn.Parameter(value.to("cuda", torch.bfloat16), requires_grad=False))
    model.tie_weights()
    return model.eval()


def time_generation(model: BitNetForCausalLM, prompt: list[int]) -> dict:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    first = None
    count = 0
    for _ in generate_tokens(model, [prompt], params):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"tokens": count, "total_s": end - start, "first_token_s": first - start,
            "decode_tok_s": (count - 1) / (end - first), "end_to_end_tok_s": count / (end - start)}


@torch.inference_mode()  # the decoder's buffers were made in inference mode
def time_step(model: BitNetForCausalLM, reps: int = 200) -> float:
    """Median time of one graph replay of the decode step (microseconds), events around each replay."""
    decoder = model._gpu_decoder
    lengths = decoder.lengths.clone()
    decoder.lengths.fill_(PROMPT + 64)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(400_000)
        start.record()
        decoder.graph.replay()
        end.record()
        decoder.lengths.fill_(PROMPT + 64)
        times.append((start, end))
    torch.cuda.synchronize()
    decoder.lengths.copy_(lengths)
    return statistics.median(s.elapsed_time(e) * 1000 for s, e in times)


def run(ternary: bool) -> dict:
    model = random_model(ternary)
    prompt = torch.randint(0, model.config.vocab_size, (PROMPT,)).tolist()
    for _ in range(2):  # warm-up: compile, capture the decode step, then the prefill
        time_generation(model, prompt)
    runs = [time_generation(model, prompt) for _ in range(REPEATS)]
    result = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    result["step_us"] = time_step(model)
    result["weights"] = "ternary W2A8" if ternary else "dense bf16"
    result["gpu_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    del model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def main(argv: list[str]) -> None:
    output = Path(argv[0]) if argv else DEFAULT_OUTPUT
    torch.manual_seed(0)
    results = [run(ternary=True), run(ternary=False)]
    print(f"{'weights':14} {'decode tok/s':>12} {'e2e tok/s':>10} {'step us':>8} {'prefill+1st ms':>14}")
    for r in results:
        print(f"{r['weights']:14} {r['decode_tok_s']:12.0f} {r['end_to_end_tok_s']:10.0f} {r['step_us']:8.0f} "
              f"{r['first_token_s'] * 1000:14.1f}")
    speedup = results[0]["decode_tok_s"] / results[1]["decode_tok_s"]
    print(f"ternary / dense decode speed: {speedup:.2f}x")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "prompt_tokens": PROMPT, "new_tokens": NEW_TOKENS, "repeats": REPEATS, "results": results,
        "ternary_over_dense": speedup,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
