"""Text from tokens, safely: pieces as bytes, incremental UTF-8 decoding, stop strings.

llama-cpp-python's `Llama.detokenize` copies each piece through a 32-byte buffer and silently
drops longer pieces; its `_internals.token_to_piece` returns the whole (NUL-padded) buffer. Here a
piece is read with `llama_token_to_piece` into a buffer that grows to the size llama.cpp asks for,
cached per token id, and pieces are joined as bytes through Python's incremental UTF-8 decoder:
a character split across tokens is held back until its last byte arrives, so it never shows as
U+FFFD, and no byte is lost. Bytes that can never form a character (a random model can emit
them) become U+FFFD exactly where a whole-text decode would put one.
"""

from __future__ import annotations

import codecs
import ctypes
from typing import Iterable, Sequence


class PieceTable:
    """Token id → the exact bytes llama.cpp prints for it (cached; specials render as empty)."""

    def __init__(self, vocab: object, *, special: bool = False):
        import llama_cpp

        self._vocab = vocab
        self._special = special
        self._to_piece = llama_cpp.llama_token_to_piece
        self._buffer = ctypes.create_string_buffer(64)
        self._cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        piece = self._cache.get(token)
        if piece is None:
            piece = self._cache[token] = self._read(token)
        return piece

    def _read(self, token: int) -> bytes:
        n = self._to_piece(self._vocab, token, self._buffer, len(self._buffer), 0, self._special)
        if n < 0:  # the buffer was too small: llama.cpp says how many bytes it needs
            self._buffer = ctypes.create_string_buffer(-n)
            n = self._to_piece(self._vocab, token, self._buffer, len(self._buffer), 0, self._special)
        return self._buffer.raw[:max(n, 0)]

    def join(self, tokens: Iterable[int]) -> bytes:
        return b"".join(self(token) for token in tokens)


class Utf8Stream:
    """Bytes in, text out, one piece at a time. `finish()` returns what is still held back:
    nothing for complete text; an unfinished final character (a generation cut mid-character by
    max_tokens or a cancel) is dropped rather than shown as U+FFFD."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def pending(self) -> bytes:
        """Bytes of an unfinished character waiting for the rest of it."""
        return self._decoder.getstate()[0]

    def finish(self) -> str:
        self._decoder.reset()
        return ""


def decode_tokens(pieces: PieceTable, tokens: Sequence[int]) -> str:
    """Decode `tokens` the way a stream does, one piece at a time (for tests and tools)."""
    stream = Utf8Stream()
    return "".join(stream.feed(pieces(token)) for token in tokens) + stream.finish()


class StopStrings:
    """Finds stop strings in streamed text. `feed` returns the text safe to show now: anything that
    might be the start of a stop string is held back until the next delta settles it."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.hit: str | None = None

    def feed(self, delta: str) -> str:
        if not self.stops:
            return delta
        text = self._held + delta
        first = None
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            self._held = ""
            self.hit = first[1]
            return text[:first[0]]
        keep = 0
        for stop in self.stops:  # the longest tail of `text` that begins some stop string
            for size in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:size]):
                    keep = size
                    break
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep] if keep else text

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
