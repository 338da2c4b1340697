"""One chat choice's reply when tools are on: content and `tool_calls`,
whole or as stream deltas in OpenAI's shape.

    named function   the reply is the arguments (enforced by grammar); the
                     stream opens the call with its id and name, then sends
                     argument text as it comes
    required         the reply is a JSON array of calls (enforced by
                     grammar); the stream sends the calls when it ends
    auto             the template's parser finds calls in free text; content
                     streams as long as it cannot be the start of a call

A reply with calls ends with finish_reason "tool_calls".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.chat_tools import call_deltas, new_call_id, parse_required, tool_calls
from server.protocol_structured import NamedToolChoice, ToolCall
from server.tool_parsers import ParsedCall, ToolParser, parse_tool_calls


def _calls_reason(reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and reason == "stop" else reason


@dataclass(slots=True)
class ToolReply:
    tool_choice: str | NamedToolChoice
    parser_type: type[ToolParser]
    parser: ToolParser | None = None
    num_calls: int = 0  # calls sent so far in the stream
    call_id: str = field(default_factory=new_call_id)

    def whole(self, text: str, reason: str | None) -> tuple[str | None, list[ToolCall], str | None]:
        """(content, calls, finish reason) of a finished reply."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return None, tool_calls([ParsedCall(choice.function.name, text)]), _calls_reason(reason, True)
        if choice == "required":
            parsed = parse_required(text)
            if parsed is None:  # cut short by max_tokens: show what there is
                return text, [], reason
            return None, tool_calls(parsed), _calls_reason(reason, True)
        content, parsed = parse_tool_calls(self.parser_type, text)
        return content or None, tool_calls(parsed), _calls_reason(reason, bool(parsed))

    def delta(self, text: str, new_text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The stream delta for a step that made `text` (the choice's text so
        far) out of `new_text` more, and its finish reason."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            call: dict[str, Any] = {"index": 0, "function": {"arguments": new_text}}
            if not self.num_calls:
                self.num_calls = 1
                call = {"index": 0, "id": self.call_id, "type": "function",
                        "function": {"name": choice.function.name, "arguments": new_text}}
            return {"tool_calls": [call]}, _calls_reason(reason, True)
        if choice == "required":
            if reason is None:
                return {}, None
            parsed = parse_required(text)
            if parsed is None:
                return {"content": text}, reason
            return {"tool_calls": call_deltas(0, parsed)}, _calls_reason(reason, True)
        if self.parser is None:
            self.parser = self.parser_type()
        content, parsed = self.parser.feed(text, reason is not None)
        delta: dict[str, Any] = {"content": content} if content else {}
        if parsed:
            delta["tool_calls"] = call_deltas(self.num_calls, parsed)
            self.num_calls += len(parsed)
        return delta, _calls_reason(reason, bool(self.num_calls))
