"""Incremental detokenization and stop strings, one instance per sample.

`tokenizers.decoders.DecodeStream` does the incremental part: it buffers
tokens until they form whole UTF-8 characters, so a multi-byte character split
across tokens never shows up as a replacement character.

Stop strings are searched only in the text that could contain a new match:
the new chunk plus the `max_stop_len - 1` characters before it. While a
request runs, the last `max_stop_len - 1` characters are held back from
`visible_text`, since they may turn out to be the start of a stop string that
must not be streamed to the client.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from inference.sampling_params import SamplingParams


class IncrementalDetokenizer:
    def __init__(self, tokenizer, params: SamplingParams) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        self.stop = params.stop
        self.include_stop = params.include_stop_str_in_output
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.stop_reason: str | None = None

    def add_token(self, token_id: int) -> bool:
        """Append one token's text; True if a stop string ended the output."""
        chunk = self._stream.step(self._backend, token_id)
        if not chunk:
            return False
        search_from = max(len(self.text) - self._holdback, 0)
        self.text += chunk
        if not self.stop:
            return False
        hits = [(self.text.find(s, search_from), s) for s in self.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return False
        pos, stop = min(hits)
        self.text = self.text[: pos + len(stop)] if self.include_stop else self.text[:pos]
        self.stop_reason = stop
        return True

    def visible_text(self, finished: bool) -> str:
        if finished or not self._holdback:
            return self.text
        return self.text[: max(len(self.text) - self._holdback, 0)]
