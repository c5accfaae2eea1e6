from __future__ import annotations

import pytest
import tokenizers
import torch
from tiny_tokenizer import CORPUS, write_tokenizer_folder

from bitnet158.errors import UserError
from bitnet158.generation import SamplingParams, generate, generate_tokens, stream
from bitnet158.generation.detokenize import StreamingDetokenizer
from bitnet158.model import BitNetConfig, BitNetForCausalLM
from bitnet158.nn import freeze_
from bitnet158.tokenizer import Tokenizer

PROMPTS = ["The quick brown fox", "Hi", "def fibonacci(n):\n    return n if", "Le café 🙂"]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_pretrained(write_tokenizer_folder(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def model(tokenizer: Tokenizer) -> BitNetForCausalLM:
    config = BitNetConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=None,
    )
    torch.manual_seed(0)
    model = BitNetForCausalLM(config)
    model.init_weights(std=1.0)  # large weights: peaked logits, varied text, no near-ties for argmax
    return freeze_(model).eval()


def token_ids(model: BitNetForCausalLM, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return torch.stack(list(generate_tokens(model, prompt_ids, params)), dim=1).tolist()


def expected_text(model, tokenizer: Tokenizer, prompt: str, params: SamplingParams) -> str:
    """The continuation decoded from the raw token stream, cut at the first EOS."""
    ids = token_ids(model, [tokenizer.encode(prompt)], params)[0]
    eos = set(model.config.eos_token_ids) | {tokenizer.eos_token_id}
    cut = next((i for i, token in enumerate(ids) if token in eos), len(ids))
    return tokenizer.decode(ids[:cut])


def find_two_token_stop(tokenizer: Tokenizer, ids: list[int]) -> tuple[str, str]:
    """A 2-character stop string made of the last character of one token and the first of the next,
    whose first occurrence is at that boundary; and the text before it."""
    text = tokenizer.decode(ids)
    for i in range(1, len(ids) - 1):
        before, after = tokenizer.decode(ids[:i]), tokenizer.decode(ids[: i + 1])
        if not before or len(after) <= len(before) or not text.startswith(after):
            continue
        stop = before[-1] + after[len(before)]
        if "\ufffd" not in stop and text.find(stop) == len(before) - 1:
            return stop, text[: len(before) - 1]
    raise AssertionError("no stop string spans two tokens")


def test_batched_greedy_equals_one_at_a_time(model, tokenizer):
    prompt_ids = [tokenizer.encode(prompt) for prompt in PROMPTS]
    assert len({len(ids) for ids in prompt_ids}) == len(PROMPTS)  # different lengths: left padding
    batched = token_ids(model, prompt_ids, GREEDY)
    assert batched == [token_ids(model, [ids], GREEDY)[0] for ids in prompt_ids]
    assert all(len(set(ids)) > 5 for ids in batched)  # not a degenerate repetition
    texts = generate(model, tokenizer, PROMPTS, GREEDY)
    assert texts == [generate(model, tokenizer, [prompt], GREEDY)[0] for prompt in PROMPTS]
    assert texts == [expected_text(model, tokenizer, prompt, GREEDY) for prompt in PROMPTS]


def test_cached_decoding_equals_full_recompute_with_repetition_penalty(model, tokenizer):
    params = SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.5)
    prompt_ids = [tokenizer.encode(prompt, add_bos=False) for prompt in PROMPTS[:3]]
    for ids, generated in zip(prompt_ids, token_ids(model, prompt_ids, params), strict=True):
        sequence = list(ids)
        with torch.inference_mode():
            for _ in range(params.max_new_tokens):
                logits = model(torch.tensor([sequence]))[0, -1]
                scores = logits[sequence]  # transformers' RepetitionPenaltyLogitsProcessor
                logits[sequence] = torch.where(scores < 0, scores * 1.5, scores / 1.5)
                sequence.append(logits.argmax().item())
        assert generated == sequence[len(ids) :]
    assert token_ids(model, prompt_ids, params) != token_ids(model, prompt_ids, GREEDY)


def test_generated_tokens_are_inference_tensors(model, tokenizer):
    tokens = next(generate_tokens(model, [tokenizer.encode("Hi")], GREEDY))
    assert tokens.is_inference() and not torch.is_inference_mode_enabled()


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_new_tokens=24, seed=3, top_p=0.9)])
def test_stream_concatenation_equals_generate(model, tokenizer, params):
    for prompt in PROMPTS:
        pieces = []
        for piece in stream(model, tokenizer, prompt, params):
            assert piece and not torch.is_inference_mode_enabled()  # no mode leaks to the caller
            pieces.append(piece)
        assert "".join(pieces) == generate(model, tokenizer, [prompt], params)[0]
        assert "".join(pieces) == expected_text(model, tokenizer, prompt, params)


def test_seeded_sampling_is_repeatable(model, tokenizer):
    def sampled(seed: int) -> list[str]:
        return generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed))

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)
    assert sampled(7) != generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=16, temperature=0))


def test_top_k_1_equals_greedy(model, tokenizer):
    greedy = generate(model, tokenizer, PROMPTS, GREEDY)
    for seed in (0, 1):
        assert generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=24, top_k=1, seed=seed)) == greedy


@pytest.mark.parametrize("source", ["config", "tokenizer"])
def test_eos_stops_the_row(model, tokenizer, monkeypatch, source):
    params = SamplingParams(max_new_tokens=24, seed=5)
    prompt_ids = [tokenizer.encode(prompt) for prompt in PROMPTS]
    monkeypatch.setattr(tokenizer, "eos_token_id", None)
    free_run = token_ids(model, prompt_ids, params)
    # EOS: a token that row 0 emits for the first time at step k > 0, which is where it must stop.
    k = next(k for k in range(3, 24) if free_run[0][k] not in free_run[0][:k])
    eos = free_run[0][k]
    if source == "config":
        monkeypatch.setattr(model.config, "eos_token_id", [999, eos])
    else:
        monkeypatch.setattr(tokenizer, "eos_token_id", eos)
    texts = generate(model, tokenizer, PROMPTS, params)
    assert texts[0] == tokenizer.decode(free_run[0][:k])
    for text, ids in zip(texts[1:], free_run[1:], strict=True):  # the other rows run on
        cut = ids.index(eos) if eos in ids else len(ids)
        assert text == tokenizer.decode(ids[:cut])
    assert "".join(stream(model, tokenizer, PROMPTS[0], params)) == texts[0]


def test_generation_stops_once_every_row_has_finished(model, tokenizer, monkeypatch):
    prompt_ids = [tokenizer.encode(prompt) for prompt in PROMPTS[:2]]
    free_run = token_ids(model, prompt_ids, GREEDY)
    eos = [free_run[0][4], free_run[1][9]]
    monkeypatch.setattr(model.config, "eos_token_id", eos)
    last_step = max(next(i for i, token in enumerate(ids) if token in eos) for ids in free_run)
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        texts = generate(model, tokenizer, PROMPTS[:2], GREEDY)
    finally:
        hook.remove()
    assert len(forwards) == 1 + last_step < 1 + GREEDY.max_new_tokens  # the prefill, then one per step
    assert texts == [expected_text(model, tokenizer, prompt, GREEDY) for prompt in PROMPTS[:2]]


def test_stop_string_spanning_two_tokens_is_cut_and_never_streamed(model, tokenizer):
    params = SamplingParams(max_new_tokens=24, seed=11)
    for prompt in PROMPTS[:2]:
        ids = token_ids(model, [tokenizer.encode(prompt)], params)[0]
        stop, before = find_two_token_stop(tokenizer, ids)
        stopped = SamplingParams(max_new_tokens=24, seed=11, stop=["never appears", stop])
        pieces = list(stream(model, tokenizer, prompt, stopped))
        assert "".join(pieces) == before
        assert generate(model, tokenizer, [prompt], stopped) == [before]


def test_detokenizer_holds_back_partial_characters_and_stop_prefixes(tokenizer):
    text = "Le café 🙂 est très bon, the quick brown fox jumps."
    ids = tokenizer.encode(text, add_bos=False)
    assert any("\ufffd" in tokenizer.decode([token]) for token in ids)  # the emoji spans tokens
    detokenizer = StreamingDetokenizer(tokenizer, tokenizer.encode("Hello"), stop=["brown fog", "k b"])
    pieces = [detokenizer.push(token) for token in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == "Le café 🙂 est très bon, the quic"
    assert detokenizer.finished and detokenizer.finish() == "" and detokenizer.push(ids[0]) == ""

    detokenizer = StreamingDetokenizer(tokenizer, [], stop=["fox!", "jumps?"])
    pieces = [detokenizer.push(token) for token in ids]
    assert "".join(pieces) == "Le café 🙂 est très bon, the quick brown fox jumps."  # no stop: all released
    held = StreamingDetokenizer(tokenizer, [], stop=["s.!"])
    streamed = "".join(held.push(token) for token in ids)
    assert streamed == text[:-2] and held.finish() == "s."  # "s." could still have become "s.!"


def test_detokenizer_keeps_the_leading_space_a_sentencepiece_decoder_drops():
    sentencepiece_like = tokenizers.Tokenizer(tokenizers.models.BPE())
    sentencepiece_like.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    sentencepiece_like.decoder = tokenizers.decoders.Metaspace()
    sentencepiece_like.train_from_iterator(CORPUS, tokenizers.trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tokenizer = Tokenizer(sentencepiece_like, {})
    ids = tokenizer.encode("The fox jumps over the lazy dog")
    prompt, generated = ids[:3], ids[3:]
    assert tokenizer.decode(prompt) == "The fox" and tokenizer.decode(generated) == "jumps over the lazy dog"
    detokenizer = StreamingDetokenizer(tokenizer, prompt, stop=[])
    text = "".join(detokenizer.push(token) for token in generated) + detokenizer.finish()
    assert text == " jumps over the lazy dog"


def test_context_full_stops_generation(model, tokenizer, monkeypatch):
    prompt_ids = [tokenizer.encode("The quick brown fox"), tokenizer.encode("Hi")]
    longest = max(len(ids) for ids in prompt_ids)
    monkeypatch.setattr(model.config, "max_position_embeddings", longest + 3)
    tokens = token_ids(model, prompt_ids, GREEDY)
    assert len(tokens[0]) == 4  # the last token is sampled from the full context and not fed back
    monkeypatch.setattr(model.config, "max_position_embeddings", longest - 1)
    with pytest.raises(UserError, match=f"the prompt is {longest} tokens, longer than the model's context"):
        generate(model, tokenizer, ["The quick brown fox"], GREEDY)


def test_max_new_tokens_and_input_errors(model, tokenizer):
    assert len(token_ids(model, [tokenizer.encode("Hi")], SamplingParams(max_new_tokens=5))[0]) == 5
    with pytest.raises(UserError, match="prompt 1 is empty"):
        generate(model, tokenizer, ["Hi", ""], GREEDY, add_bos=False)
    with pytest.raises(UserError, match="no prompts"):
        generate(model, tokenizer, [], GREEDY)
    with pytest.raises(UserError, match="token id 400, outside the model's vocabulary of 400"):
        list(generate_tokens(model, [[1, 400]], GREEDY))
