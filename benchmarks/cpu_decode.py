"""CPU decode speed: bitnet158 (native kernels and decoder) against llama.cpp's TQ2_0 kernels on the same weights.

Two models: the embedded model, and the bitnet-b1.58-2B-4T architecture cut to 5 layers (about 680M
parameters: 328M in the tied embedding, 348M ternary) with random ternary weights. Each is exported
with our `save_gguf` (TQ2_0 ternary, F16 token embedding, which llama.cpp also uses as the output
layer) and loaded by llama.cpp through llama-cpp-python. Our side loads the model folder in the dtype
it ships in (bfloat16: the embedding/lm_head has the same 2 bytes per weight as llama.cpp's F16) and
generates through `generate_tokens` (BitNetForCausalLM with a KVCache, greedy sampling); the embedded
model also runs in float32, as the CLI loads it on the CPU.

Both sides decode the same number of new tokens greedily after the same prompt with the same number of
threads; tokens/s counts decode steps only (the first token, which needs the prompt's prefill, is not
timed). Runs alternate between the two, and the table shows the median of REPEATS runs.

The lm_head (the tied embedding: a [vocab, hidden] GEMV that reads 656 MB of bfloat16 per token on
the 2B4T cut) is also timed on its own through the native decoder, and its read bandwidth is set
against the machine's copy bandwidth (benchmarks/cpu_kernels.py's `copy_`, bytes read + written); the
embedded model's lm_head (8 MB in bfloat16, 16 MB in float32) can come from cache, so its figure is not a DRAM one.
llama.cpp runs our relu² models with its SiLU MLP (see tests/test_llama_cpp.py): the same work.

    python benchmarks/cpu_decode.py [--threads N] [--output benchmarks/results/cpu_decode.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from cpu_kernels import copy_bandwidth  # benchmarks/: the same copy benchmark as the kernel table

from bitnet158 import BitNetConfig, BitNetForCausalLM, PackedBitLinear, freeze_
from bitnet158.cli.model_loading import embedded_model_path
from bitnet158.formats.gguf_export import save_gguf
from bitnet158.generation.generate import generate_tokens
from bitnet158.generation.sampling import SamplingParams
from bitnet158.kernels import cpu
from bitnet158.packing import pack_2bit
from bitnet158.tokenizer import Tokenizer

CONFIG_2B4T = Path(__file__).resolve().parents[2] / "shared" / "reference" / "bitnet-b1.58-2B-4T.config.json"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "cpu_decode.json"
GB = 1e9
SCALED_LAYERS = 5
REPEATS = 3
PROMPT = "def fibonacci(n):\n"


@torch.no_grad()
def write_scaled_2b4t(folder: Path) -> None:
    """2B4T's config with SCALED_LAYERS layers and random packed ternary weights, bf16 embeddings."""
    config = json.loads(CONFIG_2B4T.read_text())
    # The embedded model's tokenizer (padded to 2B4T's vocabulary in the GGUF) and its special ids.
    config.update(num_hidden_layers=SCALED_LAYERS, bos_token_id=0, eos_token_id=[1, 2])
    config = _config(config, folder)
    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = freeze_(BitNetForCausalLM(config))
    for module in model.modules():
        if isinstance(module, PackedBitLinear):
            codes = torch.randint(-1, 2, (module.out_features, module.in_features), dtype=torch.int8,
                                  generator=generator)
            module.weight = pack_2bit(codes)
            module.weight_scale = torch.rand(1, generator=generator) + 0.5
    for name, param in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        value = (torch.randn(param.shape, generator=generator) * 0.02).bfloat16() if param.dim() == 2 \
            else torch.ones(param.shape)
        setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(value, requires_grad=False))
    model.tie_weights()
    model.save_pretrained(folder)
    Tokenizer.from_pretrained(embedded_model_path()).save_pretrained(folder)


def _config(values: dict, folder: Path) -> BitNetConfig:
    """The config as `BitNetConfig` reads it from a folder (save_pretrained writes it again)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(values))
    return BitNetConfig.from_json(path)


def ours(model: BitNetForCausalLM, prompt_ids: list[int], steps: int) -> float:
    """Decode tokens/s of `generate_tokens` (greedy), first token (prefill) not timed."""
    params = SamplingParams(max_new_tokens=steps + 1, temperature=0.0)
    tokens = generate_tokens(model, [prompt_ids], params)
    next(tokens)
    started = time.perf_counter()
    count = sum(1 for _ in tokens)
    return count / (time.perf_counter() - started)


def theirs(llm, prompt_ids: list[int], steps: int) -> float:
    llm.reset()
    tokens = llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True)
    next(tokens)
    started = time.perf_counter()
    count = 0
    for _ in tokens:
        count += 1
        if count == steps:
            break
    return count / (time.perf_counter() - started)


@torch.inference_mode()
def lm_head_seconds(model: BitNetForCausalLM, reps: int = 21) -> float:
    """Median time of the native decoder's lm_head alone on one token (weights streamed from DRAM when large)."""
    decoder = model.__dict__.get("_native_decoder")  # built by the warm-up generation
    if decoder is None:
        raise RuntimeError("the native decoder did not run: nothing to time")
    hidden = torch.randn(1, model.config.hidden_size)
    decoder.lm_head(hidden)
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        decoder.lm_head(hidden)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench(label: str, folder: Path, gguf: Path, dtype: torch.dtype | None, steps: int, threads: int) -> dict:
    import llama_cpp

    model = BitNetForCausalLM.from_pretrained(folder, dtype=dtype)
    prompt_ids = Tokenizer.from_pretrained(folder).encode(PROMPT)
    llm = llama_cpp.Llama(str(gguf), n_ctx=len(prompt_ids) + steps + 8, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    ours(model, prompt_ids, 4)  # warm up: builds the native decoder, chooses kernel styles
    theirs(llm, prompt_ids, 4)
    runs: dict[str, list[float]] = {"ours": [], "llama_cpp": []}
    for _ in range(REPEATS):
        runs["ours"].append(ours(model, prompt_ids, steps))
        runs["llama_cpp"].append(theirs(llm, prompt_ids, steps))
    del llm
    head_s = lm_head_seconds(model)
    head_bytes = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    counts = model.config.num_parameters()
    ours_tps, theirs_tps = statistics.median(runs["ours"]), statistics.median(runs["llama_cpp"])
    return {"model": label, "dtype": str(model.dtype).removeprefix("torch."), "parameters": sum(counts.values()),
            "ternary_parameters": counts["ternary"], "steps": steps, "threads": threads,
            "ours_tokens_s": ours_tps, "llama_cpp_tq2_0_tokens_s": theirs_tps, "ratio": ours_tps / theirs_tps,
            "ours_runs": runs["ours"], "llama_cpp_runs": runs["llama_cpp"], "gguf_mib": gguf.stat().st_size / 2**20,
            "lm_head_ms": head_s * 1e3, "lm_head_mb": head_bytes / 1e6, "lm_head_gb_s": head_bytes / head_s / GB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=cpu.default_threads())
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    if not cpu.available():
        raise SystemExit(f"native CPU kernels unavailable: {cpu.describe()}")
    torch.set_num_threads(args.threads)
    cpu.set_threads(args.threads)
    bandwidth = copy_bandwidth() / GB
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        embedded = embedded_model_path()
        embedded_gguf = Path(tmp) / "embedded-tq2_0.gguf"
        save_gguf(BitNetForCausalLM.from_pretrained(embedded), Tokenizer.from_pretrained(embedded), embedded_gguf)
        scaled = Path(tmp) / "scaled-2b4t"
        write_scaled_2b4t(scaled)
        scaled_gguf = Path(tmp) / "scaled-2b4t-tq2_0.gguf"
        save_gguf(BitNetForCausalLM.from_pretrained(scaled), Tokenizer.from_pretrained(scaled), scaled_gguf)
        rows.append(bench("embedded", embedded, embedded_gguf, None, 256, args.threads))
        rows.append(bench("embedded", embedded, embedded_gguf, torch.float32, 256, args.threads))
        rows.append(bench(f"2B4T x {SCALED_LAYERS} layers, random", scaled, scaled_gguf, None, 48, args.threads))

    print(f"{cpu.describe()}; llama.cpp TQ2_0 via llama-cpp-python; {args.threads} threads each")
    header = ["model", "params", "our dtype", "new tokens", "ours tok/s", "llama.cpp tok/s", "ours / llama.cpp",
              "lm_head MB", "lm_head ms", "lm_head GB/s (share of copy)"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        print(f"{r['model']} | {r['parameters'] / 1e6:.0f}M | {r['dtype']} | {r['steps']} | {r['ours_tokens_s']:.1f} | "
              f"{r['llama_cpp_tq2_0_tokens_s']:.1f} | {r['ratio']:.2f} | {r['lm_head_mb']:.0f} | "
              f"{r['lm_head_ms']:.2f} | {r['lm_head_gb_s']:.1f} ({r['lm_head_gb_s'] / bandwidth:.0%})")
    print(f"copy bandwidth (read + write, benchmarks/cpu_kernels.py): {bandwidth:.1f} GB/s")
    import llama_cpp

    machine = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
               "torch": torch.__version__, "llama_cpp_python": llama_cpp.__version__, "kernels": cpu.describe()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r["lm_head_bandwidth_share"] = r["lm_head_gb_s"] / bandwidth
    args.output.write_text(json.dumps({"machine": machine, "copy_bandwidth_gb_s": bandwidth, "results": rows},
                                      indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
