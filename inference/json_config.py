"""The JSON objects of config flags (--kv-events-config, --speculative-config):
parsed, and their keys checked against the fields of the dataclass they fill.

Invariant: what `parse_object` and `check_object` return is a dict whose
keys are all field names of that dataclass; anything else is a ValueError
saying what is wrong, in words fit for a one-line start-up error.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any


def parse_object(text: str, cls: type) -> dict[str, Any]:
    """The JSON object in `text`, its keys fields of the dataclass `cls`."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    return check_object(raw, cls)


def check_object(raw: Any, cls: type) -> dict[str, Any]:
    """`raw` itself, if it is a dict whose keys are fields of the dataclass `cls`."""
    if not isinstance(raw, dict):
        raise ValueError("must be a JSON object")
    known = sorted(f.name for f in fields(cls))
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; known: {known}")
    return raw
