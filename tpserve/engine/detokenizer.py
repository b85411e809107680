"""Incremental detokenisation and stop-string matching for one request.

Text is produced by decoding a short window of ids twice (with and without the newest tokens) and
taking the difference, so each step costs O(window), and a token that ends inside a multi-byte
character yields nothing until the character completes. Streamed text is held back by
(longest stop string - 1) characters so a stop string is never half-sent.
"""

from __future__ import annotations

# Prompt tokens decoded with the first output tokens, so leading spaces and merges come out right.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = list(stop or [])
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.num_sent = 0
        self.stopped_by: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_ids: list[int], check_stop: bool = True) -> None:
        """Append generated tokens; sets `stopped_by` (and truncates `text`) on a stop string."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            start = len(self.text)
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            if check_stop and self.stop:
                self._match_stop(max(0, start - self.hold))

    def _match_stop(self, search_from: int) -> None:
        best = None
        for s in self.stop:
            idx = self.text.find(s, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is not None:
            self.text = self.text[: best[0]]
            self.stopped_by = best[1]

    def delta(self, finished: bool) -> str:
        """Text not yet sent; while running, the last `hold` characters wait for a possible stop."""
        end = len(self.text) if finished else max(self.num_sent, len(self.text) - self.hold)
        out = self.text[self.num_sent : end]
        self.num_sent = end
        return out
