"""A tiny byte-level BPE tokenizer folder, trained in a moment, laid out like Microsoft's BitNet one."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from bitnet158.formats.gguf_tokenizer import LLAMA3_SPLIT

BOS, EOT, EOS = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"

# The chat template of microsoft/bitnet-b1.58-2B-4T, with the BOS token in front.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ message['role'] | capitalize + ': ' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A ternary weight is minus one, zero or plus one, and one scale per tensor.",
    "BitNet models quantize activations to eight bits per token with an absmax scale.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "User: What is the capital of France?\nAssistant: The capital of France is Paris.",
    "Le café est très bon, naïve élève, à bientôt!",
    "日本語のテキストも少しあります。",
    "Emoji are four bytes long: 🙂 🚀 ✨.",
    "Numbers like 3.14159, 2718 and 1,000,000 appear in text too.",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
]
CORPUS = [f"{sentence} {i}" for i in range(12) for sentence in _SENTENCES]


def build_tokenizer(llama3: bool = False) -> Tokenizer:
    """GPT-2's byte-level pre-tokenizer, or with `llama3` Llama 3's (as Microsoft's 2B4T has): its split
    pattern, byte-level mapping without a regex, and whole pre-tokens found in the vocabulary kept as they are."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]) if llama3 else pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[BOS, EOS, EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    # Like Llama 3's tokenizer.json: the post-processor adds BOS.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    if llama3:
        spec = json.loads(tokenizer.to_str())
        spec["model"]["ignore_merges"] = True
        tokenizer = Tokenizer.from_str(json.dumps(spec))
    return tokenizer


def write_tokenizer_folder(folder: Path, llama3: bool = False, **config_overrides) -> Path:
    """`tokenizer.json` and a transformers-style `tokenizer_config.json` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(llama3).save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "eos_token": EOT,
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **config_overrides,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
