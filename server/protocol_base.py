"""Building blocks of the request and response models (server/protocol.py,
server/protocol_structured.py)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text (it holds a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]


def _omitted() -> Any:
    return Field(default=None, exclude_if=lambda value: value is None)


class _Request(BaseModel):
    # NaN and infinity are valid Python JSON but never valid parameters.
    model_config = ConfigDict(allow_inf_nan=False)
