"""The serving scheduler's prompt budget (whole prompts, chunks, or both by prompt length), and the
engine's promise that chunking, batching and overlapping steps do not change a request's tokens."""

from __future__ import annotations

import pytest
import torch

from bitnet158.cli.model_loading import load_model
from bitnet158.generation.detokenize import StreamingDetokenizer
from bitnet158.generation.sampling import SamplingParams, make_generator, sample
from bitnet158.kernels import cpu
from bitnet158.serve.engine import Engine
from bitnet158.serve.request import Delta, Event, Finished, Request, StepStats
from bitnet158.serve.runner import ModelRunner
from bitnet158.serve.scheduler import Scheduler


def _request(prompt_ids: list[int], max_new_tokens: int = 4) -> Request:
    # The scheduler and the runner do not use the detokenizer.
    return Request(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0), None)


def _chunks(work: list[tuple[Request, list[int]]]) -> list[tuple[int, list[int]]]:
    return [(request.slot, chunk) for request, chunk in work]


def _whole(length: int) -> None:
    return None


def test_whole_prompts_within_the_budget_and_at_least_one():
    scheduler = Scheduler(max_batch=4, max_prefill_tokens=10)
    first, second, third, huge = _request([1] * 6), _request([2] * 6), _request([3] * 3), _request([4] * 15)
    for request in (first, second, third, huge):
        scheduler.submit(request)
    assert _chunks(scheduler.admit(_whole)) == [(0, [1] * 6)]  # the second does not fit beside it
    assert _chunks(scheduler.admit(_whole)) == [(1, [2] * 6), (2, [3] * 3)]
    assert _chunks(scheduler.admit(_whole)) == [(3, [4] * 15)]  # alone, past the budget
    assert scheduler.decoding() == []  # nothing sampled yet
    first.sampled = 1
    assert scheduler.decoding() == [first]
    first.sampled = 4  # its max_new_tokens drawn: it ends by length, with no more steps
    assert scheduler.decoding() == []


def test_chunked_prompts_share_the_budget_oldest_first():
    scheduler = Scheduler(max_batch=2, max_prefill_tokens=4)
    first, second, third = _request([1, 2, 3, 4, 5, 6]), _request([7, 8, 9]), _request([10])
    for request in (first, second, third):
        scheduler.submit(request)
    assert _chunks(scheduler.admit(lambda n: 100)) == [(0, [1, 2, 3, 4])]
    assert _chunks(scheduler.admit(lambda n: 100)) == [(0, [5, 6]), (1, [7, 8])]
    assert _chunks(scheduler.admit(lambda n: 100)) == [(1, [9])]
    assert scheduler.admit(lambda n: 100) == [] and scheduler.counts() == (2, 1)  # no free slot for the third
    scheduler.retire(first)
    assert _chunks(scheduler.admit(lambda n: 100)) == [(0, [10])]


def test_short_prompts_a_token_per_step_long_ones_whole():
    """CUDA's rule: prompts of at most 3 tokens here go one token per step (graph rows), longer ones whole; both
    within the budget, a long one first in its step even past it."""
    scheduler = Scheduler(max_batch=4, max_prefill_tokens=6)
    short, long, other, longer = _request([1, 2]), _request([3] * 5), _request([4]), _request([5] * 8)
    for request in (short, long, other, longer):
        scheduler.submit(request)

    def chunk(length: int) -> int | None:
        return None if length > 3 else 1

    assert _chunks(scheduler.admit(chunk)) == [(0, [1]), (1, [3] * 5)]  # 6 tokens: the budget
    assert _chunks(scheduler.admit(chunk)) == [(0, [2]), (2, [4])]  # the 8-token prompt does not fit beside them
    assert _chunks(scheduler.admit(chunk)) == [(3, [5] * 8)]
    assert scheduler.admit(chunk) == []


def _serve(
    model, arrivals: dict[int, list[list[int]]], budget: int, slots: int = 4
) -> list[tuple[list[int], torch.Tensor]]:
    """Run the scheduler and runner step by step, each step's tokens handled before the next (arrivals: step ->
    prompts); each request's 6 tokens and their logits."""
    runner = ModelRunner(model, slots)
    scheduler = Scheduler(max_batch=slots, max_prefill_tokens=budget)
    requests, results = [], {}
    for step in range(max(arrivals) + 1000):
        for prompt in arrivals.get(step, []):
            requests.append(_request(prompt, max_new_tokens=6))
            scheduler.submit(requests[-1])
        decoding = scheduler.decoding()
        prompts = scheduler.admit(runner.prompt_chunk)
        if not prompts and not decoding:
            if step >= max(arrivals):
                break
            continue
        ready, logits = runner.step(prompts, decoding)
        for request, row, (token, _) in zip(ready, logits, runner.sample(ready, logits).results(), strict=True):
            request.generated += 1
            results.setdefault(id(request), ([], []))[0].append(token)
            results[id(request)][1].append(row.clone())
            if request.generated == request.params.max_new_tokens:
                scheduler.retire(request)
                runner.release(request.slot)
    return [(results[id(r)][0], torch.stack(results[id(r)][1])) for r in requests]


Spec = tuple[list[int], SamplingParams]
Outcome = tuple[list[int], str, str | None]


def _run_engine(
    model, tokenizer, arrivals: dict[int, list[Spec]], overlaps: bool, slots: int = 4, eos_ids: set[int] = frozenset(),
    cancel: tuple[int, int] | None = None,
) -> list[Outcome]:
    """Run an `Engine` step by step, as its thread does, with `runner.overlaps` as given. `arrivals`: step ->
    (prompt, parameters) of requests submitted before it; `cancel`: (i, n), the i-th request to arrive is
    cancelled once the engine has handled n of its tokens. Each request's tokens, text and finish reason (None:
    cancelled)."""
    runner = ModelRunner(model, slots)
    runner.overlaps = overlaps
    sent: dict[str, list[Event]] = {}  # what the engine emits, by request

    def emit(events: list[tuple[Request, Event]], stats: StepStats) -> None:
        assert stats.running <= slots
        for request, event in events:
            sent.setdefault(request.id, []).append(event)

    engine = Engine(runner, Scheduler(slots, max_prefill_tokens=128), set(eos_ids), emit)
    requests: list[Request] = []
    for step in range(10_000):
        for prompt, params in arrivals.get(step, []):
            detokenizer = StreamingDetokenizer(tokenizer, prompt, params.stop)
            requests.append(Request(prompt, params, detokenizer, top_logprobs=0))  # sends token ids
            engine.submit(requests[-1])
        if cancel is not None and len(requests) > cancel[0] and requests[cancel[0]].generated == cancel[1]:
            engine.cancel(requests[cancel[0]])
        if step > max(arrivals) and all(request.done for request in requests):
            break
        engine.step()
    outcomes = []
    for request in requests:
        events = sent.get(request.id, [])
        deltas = [event for event in events if isinstance(event, Delta)]
        reasons = [event.reason for event in events if isinstance(event, Finished)]
        assert len(reasons) <= 1
        outcomes.append(([d.logprob.token_id for d in deltas if d.logprob], "".join(d.text for d in deltas),
                         reasons[0] if reasons else None))
    return outcomes


def check_overlapped_engine(model, tokenizer, texts: list[str], slots: int) -> None:
    """Requests arriving at different steps, beside each other, in the synchronous engine and in the overlapped
    one (each step launched before the host handles the previous one's tokens), get exactly the tokens and text
    they get alone: one ends on EOS and one on a stop string while others continue (their slots reused), one is
    sampled with a seed, one is cancelled midway."""
    prompts = [tokenizer.encode(text) for text in texts]

    def greedy(max_new_tokens: int, stop: tuple[str, ...] = ()) -> SamplingParams:
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop=list(stop))

    specs = [(prompts[0], greedy(12)), (prompts[1], greedy(16)), (prompts[2], greedy(16)),
             (prompts[3], SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7)),
             (prompts[4], greedy(30)), (prompts[5], greedy(10)), (prompts[0][:3], greedy(14)),
             (prompts[3][:2], greedy(9))]
    plain = _run_engine(model, tokenizer, {0: specs}, False, slots)
    # A token that only the second request makes ends it early; a piece of its text ends the third one midway.
    eos = next(token for token in plain[1][0][2:] if not any(token in other[0] for other in plain[:1] + plain[2:]))
    text = plain[2][1]
    specs[2] = (prompts[2], greedy(16, (text[len(text) // 2 : len(text) // 2 + 2],)))
    arrivals = {0: specs[:4], 1: specs[4:6], 3: specs[6:]}
    # With as many slots: on CUDA the lm_head always runs on all of them (the summation order of cuBLAS).
    alone = [_run_engine(model, tokenizer, {0: [spec]}, False, slots, {eos})[0] for spec in specs]
    assert alone[1][2] == "stop" and len(alone[1][0]) < 16
    assert alone[2][2] == "stop" and len(alone[2][0]) < 16 and specs[2][1].stop[0] not in alone[2][1]
    assert [reason for _, _, reason in alone] == ["length", "stop", "stop"] + ["length"] * 5
    for overlaps in (False, True):
        together = _run_engine(model, tokenizer, arrivals, overlaps, slots, {eos}, cancel=(4, 3))
        for index, (outcome, lone) in enumerate(zip(together, alone, strict=True)):
            if index == 4:  # cancelled after 3 tokens (a 4th, on its way, is dropped): its first 3, and no end
                assert outcome[0] == lone[0][:3] and outcome[2] is None
            else:
                assert outcome == lone, (overlaps, index)


TEXTS = ["import os\n", "class Stack:\n    def", "def main():", "# C", "from typing import", "if __name__"]


@pytest.fixture(scope="module")
def embedded():
    return load_model(None, torch.device("cpu"))


@pytest.mark.skipif(not cpu.available(), reason="prompt chunks need the native CPU kernels (not built here)")
@torch.inference_mode()
def test_chunked_batched_requests_get_their_lone_tokens(embedded):
    """Requests arriving at different steps, their prompts cut into chunks of at most 3 tokens beside other
    requests' chunks and decoding, get exactly the tokens and logits they get alone with whole prompts."""
    model, tokenizer = embedded
    prompts = [tokenizer.encode(text) for text in ("import os\n", "class Stack:\n    def", "def main():", "# C")]
    assert ModelRunner(model, 1).prompt_chunk(1000) == model.config.max_position_embeddings
    alone = [_serve(model, {0: [prompt]}, budget=512)[0] for prompt in prompts]
    together = _serve(model, {0: prompts[:2], 2: prompts[2:3], 3: prompts[3:]}, budget=3)
    for (tokens, logits), (lone_tokens, lone_logits) in zip(together, alone, strict=True):
        assert tokens == lone_tokens
        assert torch.equal(logits, lone_logits)


@torch.inference_mode()
def test_pytorch_path_prefills_whole_prompts(embedded, monkeypatch):
    """Without the native decoder (here switched off) prompts are prefilled whole through the model's forward,
    several in one right-padded batch, and decode beside each other: each request gets its lone tokens."""
    monkeypatch.setenv("BITNET158_CPU_KERNELS", "0")
    model, tokenizer = embedded
    prompts = [tokenizer.encode(text) for text in ("import os\n", "class Stack:\n    def", "# C")]
    assert ModelRunner(model, 1).prompt_chunk(2) is None
    alone = [_serve(model, {0: [prompt]}, budget=512)[0][0] for prompt in prompts]
    together = _serve(model, {0: prompts[:2], 2: prompts[2:]}, budget=512)
    assert [tokens for tokens, _ in together] == alone


@torch.inference_mode()
def test_overlapped_engine_gives_the_lone_tokens(embedded):
    """On the CPU the engine handles each step's tokens at once; here it is made to overlap as on CUDA (the
    runner feeds the decoding rows the tokens it sampled, wherever the host is)."""
    model, tokenizer = embedded
    assert not ModelRunner(model, 1).overlaps
    check_overlapped_engine(model, tokenizer, TEXTS, slots=4)


def test_sampling_draws_what_multinomial_draws():
    """`sample` avoids `torch.multinomial`'s checks (which wait for the GPU) but draws the same tokens from the
    same seeds, and leaves the generator in the same state."""
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * 4
    for seed in range(50):
        ours, theirs = make_generator(seed, logits.device), make_generator(seed, logits.device)
        assert torch.equal(sample(logits, ours), torch.multinomial(logits.softmax(-1), 1, generator=theirs)[:, 0])
        assert torch.equal(torch.rand(4, generator=ours), torch.rand(4, generator=theirs))
