"""SlotCache: sequences of different lengths, started at different steps, decode together and each
gets the logits it would get alone."""

from __future__ import annotations

import torch

from bitnet158.model.slot_cache import SlotCache


@torch.no_grad()
def test_slots_with_their_own_lengths_match_uncached_forward(make_model, assert_logits_match):
    model = make_model()
    cache = SlotCache(model.config, num_slots=3, max_length=32)
    vocab = model.config.vocab_size
    sequences = {0: torch.randint(vocab, (5,)).tolist(), 2: torch.randint(vocab, (3,)).tolist()}

    def check(slots: list[int], logits: torch.Tensor) -> None:
        for row, slot in enumerate(slots):
            alone = model(torch.tensor([sequences[slot]]))[0, -1]
            assert_logits_match(logits[row][None], alone[None])

    # Two prompts of different lengths prefilled together, right-padded.
    width = max(len(s) for s in sequences.values())
    padded = torch.tensor([sequences[s] + [0] * (width - len(sequences[s])) for s in (0, 2)])
    logits = model(padded, cache.batch([0, 2], [5, 3]))
    check([0, 2], logits[[0, 1], [4, 2]])
    # Slot 1 (holding stale keys from an earlier request) starts while the others are mid-generation.
    cache.keys[:, 1].normal_()
    cache.values[:, 1].normal_()
    for step in range(4):
        if step == 2:
            sequences[1] = torch.randint(vocab, (4,)).tolist()
            check([1], model(torch.tensor([sequences[1]]), cache.batch([1], [4]))[:, -1])
        slots = sorted(sequences)
        for slot in slots:
            sequences[slot].append(int(torch.randint(vocab, ())))
        logits = model(torch.tensor([[sequences[s][-1]] for s in slots]), cache.batch(slots, [1] * len(slots)))
        check(slots, logits[:, -1])
    assert cache.lengths == [len(sequences[0]), len(sequences[1]), len(sequences[2])]
    assert cache.tokens_held() == sum(cache.lengths)
