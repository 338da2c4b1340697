"""Tool-call parsers: the model's text to OpenAI `tool_calls`, whole or streamed.

Two formats, picked from the chat template:
- Hermes (Qwen2.5/Qwen3, and the format pagedinfer writes into the system
  message of templates without tools support):
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call;
- Llama-3 JSON: the reply is `{"name": ..., "parameters": {...}}`, several
  separated by `;`, optionally after `<|python_tag|>`.

A parser is fed the cumulative text of one choice and returns what is new:
content to show and calls that just completed. It holds back text that may
still turn into a call, so a stream never shows tool-call markup as content;
text that never became a valid call is given back as content at the end.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(slots=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text


def _call(obj: object, arguments_key: str) -> ParsedCall | None:
    """A call from a decoded {"name", arguments_key} object; None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", {}))
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except json.JSONDecodeError:
            return None
        return ParsedCall(obj["name"], arguments)
    return ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _held_back(text: str, marker: str) -> int:
    """Length of the tail of `text` that could be the start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


@dataclass(slots=True)
class HermesToolParser:
    OPEN = "<tool_call>"
    BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    num_content: int = 0  # characters of the text handed out as content
    num_blocks: int = 0  # complete <tool_call> blocks already read
    num_calls: int = 0

    def feed(self, text: str, finished: bool) -> tuple[str, list[ParsedCall]]:
        start = text.find(self.OPEN)
        if start < 0:
            end = len(text) if finished else len(text) - _held_back(text, self.OPEN)
            return self._content(text, end), []
        content = self._content(text, start)
        calls = []
        blocks = self.BLOCK.findall(text, start)
        for body in blocks[self.num_blocks :]:
            try:
                call = _call(json.loads(body), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is not None:
                calls.append(call)
        self.num_blocks = len(blocks)
        self.num_calls += len(calls)
        if finished and not self.num_calls:
            content += self._content(text, len(text))  # markup that never held a valid call
        return content, calls

    def _content(self, text: str, end: int) -> str:
        if end <= self.num_content:
            return ""
        piece, self.num_content = text[self.num_content : end], end
        return piece


@dataclass(slots=True)
class Llama3JsonToolParser:
    PYTHON_TAG = "<|python_tag|>"

    num_content: int = 0
    is_content: bool = False  # decided: the reply is plain text

    def feed(self, text: str, finished: bool) -> tuple[str, list[ParsedCall]]:
        if not self.is_content:
            body = text.lstrip()
            tag = self.PYTHON_TAG
            maybe_call = not body or body.startswith(("{", tag)) or tag.startswith(body)
            if maybe_call and not finished:
                return "", []  # may still be a call: hold it all
            if maybe_call:
                calls = self._parse(body.removeprefix(tag))
                if calls is not None:
                    return "", calls
            self.is_content = True
        piece, self.num_content = text[self.num_content :], len(text)
        return piece, []

    @staticmethod
    def _parse(body: str) -> list[ParsedCall] | None:
        decoder = json.JSONDecoder()
        calls, position = [], 0
        while True:
            try:
                obj, position = decoder.raw_decode(body, position)
            except json.JSONDecodeError:
                return None
            call = _call(obj, "parameters")
            if call is None:
                return None
            calls.append(call)
            rest = body[position:].lstrip()
            if not rest:
                return calls
            if not rest.startswith(";"):
                return None
            position = len(body) - len(rest) + 1
            while position < len(body) and body[position].isspace():
                position += 1


ToolParser = HermesToolParser | Llama3JsonToolParser


def parser_for_template(chat_template: str | None) -> type[ToolParser]:
    """Llama-3 JSON for templates that write Llama 3's tool prompt, else Hermes."""
    template = chat_template or ""
    if "<tool_call>" not in template and ("<|python_tag|>" in template or "ipython" in template):
        return Llama3JsonToolParser
    return HermesToolParser


def parse_tool_calls(parser: type[ToolParser], text: str) -> tuple[str, list[ParsedCall]]:
    """A whole reply: its content and calls."""
    return parser().feed(text, True)
