"""The wire format of core messages: one tag byte naming the class, then the
message as msgpack (msgspec encodes and decodes the dataclasses directly,
running their `__post_init__` checks on the way in)."""

from __future__ import annotations

from typing import Any

import msgspec


class Codec:
    """Encodes instances of `types` and decodes what the peer's Codec over
    the same `types` encoded."""

    def __init__(self, types: tuple[type, ...]) -> None:
        self._tags = {cls: bytes([tag]) for tag, cls in enumerate(types)}
        self._decoders = [msgspec.msgpack.Decoder(cls) for cls in types]
        self._encoder = msgspec.msgpack.Encoder()

    def encode(self, message: Any) -> bytes:
        return self._tags[type(message)] + self._encoder.encode(message)

    def decode(self, frame: bytes | memoryview) -> Any:
        view = memoryview(frame)
        return self._decoders[view[0]].decode(view[1:])
