"""Turning one sequence's generated tokens into text pieces as they arrive, cut at stop strings."""

from __future__ import annotations

from bitnet158.tokenizer import Tokenizer

# Prompt tokens decoded along with the first generated ones: some decoders treat the start of a text
# specially (SentencePiece drops a leading space), and a continuation is not the start of a text.
PROMPT_CONTEXT = 5


class StreamingDetokenizer:
    """`push(token)` returns the text that token adds, `finish()` the rest; their concatenation is the
    sequence's text up to (without) the first stop string.

    Each step decodes a short window, the tokens of the last piece plus the new ones, and hands out
    what the new ones add, so the cost per token does not grow with the length of the text. Text is
    held back while it ends in an incomplete UTF-8 character ("\\ufffd") or in something that could
    still become a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0  # the window starts here; ids[prefix_offset:read_offset] decode to prefix_text
        self.read_offset = len(self.ids)
        self.prefix_text = tokenizer.decode(self.ids)
        self.text = ""  # the generated text so far
        self.emitted = 0  # how much of `text` has been handed out
        self.finished = False

    def push(self, token_id: int) -> str:
        if self.finished:
            return ""
        self.ids.append(token_id)
        window = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(window) > len(self.prefix_text) and not window.endswith("\ufffd"):
            self.text += window[len(self.prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        return self._release(final=False)

    def finish(self) -> str:
        """End the sequence (EOS, length limit) and return all text still held back."""
        if self.finished:
            return ""
        window = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.text += window[len(self.prefix_text) :]
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        # A stop string cannot start before `emitted`: a tail that could begin one is never handed out.
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            self.text, final = self.text[: min(hits)], True
        end = len(self.text) if final else len(self.text) - self._partial_stop_length()
        piece = self.text[self.emitted : end]
        self.emitted, self.finished = end, final
        return piece

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of the unsent text that is the beginning of a stop string."""
        longest = max((len(s) - 1 for s in self.stop), default=0)
        for length in range(min(longest, len(self.text) - self.emitted), 0, -1):
            tail = self.text[-length:]
            if any(s.startswith(tail) for s in self.stop):
                return length
        return 0
