"""The body /v1/completions/render and /v1/chat/completions/render answer with.

It is vLLM's `GenerateRequest`, the token-in request of its disaggregated
serving API: what the engine would run for a completion or chat request,
after tokenization and the chat template, with nothing generated. A router
reads `token_ids` to compute block hashes with the engine's own tokenizer and
template. The requests are the ones of /v1/completions and
/v1/chat/completions (server/protocol.py).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from server.protocol import StreamOptions
from server.protocol_base import _omitted


class RenderedRequest(BaseModel):
    request_id: str  # "cmpl-…" or "chatcmpl-…", as vLLM names them
    token_ids: list[int]
    features: None = None  # vLLM's multimodal placeholders; prompts here are text only
    sampling_params: dict[str, Any]  # the engine's SamplingParams, under vLLM's field names
    model: str | None  # as the request gave it
    stream: bool
    stream_options: StreamOptions | None  # only with stream, as vLLM copies it
    cache_salt: str | None
    priority: int
    kv_transfer_params: None = None  # vLLM's disaggregated-prefill hand-off; not used here
    # Not in vLLM's GenerateRequest: the chat-templated prompt the token ids
    # encode, so a client can see what the template made of the messages.
    prompt: str | None = _omitted()
