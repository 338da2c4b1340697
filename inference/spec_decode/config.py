"""`--speculative-config`: vLLM's SpeculativeConfig JSON, the same field names.

    {"method": "ngram", "num_speculative_tokens": 4,
     "prompt_lookup_min": 2, "prompt_lookup_max": 5}

`ngram` is served. `suffix` and `draft_model` are parsed and checked field
by field (a draft model also against the target: draft_check.py), but
start-up refuses them (not built yet) rather than serving them wrongly; any
other method is unknown. Plain data (no torch): it travels to the front end inside the
engine config.

Invariant: a parsed config is valid for its method: 1 <= num_speculative_tokens
<= MAX_SPECULATIVE_TOKENS and, for ngram, 1 <= prompt_lookup_min <=
prompt_lookup_max; fields of another method are refused, not ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inference.json_config import check_object, parse_object

SERVED_METHODS = ("ngram",)
NOT_BUILT_METHODS = ("suffix", "draft_model")
MAX_SPECULATIVE_TOKENS = 16
# vLLM's defaults where the JSON leaves them out.
DEFAULT_PROMPT_LOOKUP = 5
DEFAULT_SUFFIX_TREE_DEPTH = 24

# method -> the fields it takes besides `method` and `num_speculative_tokens`
_METHOD_FIELDS = {
    "ngram": {"prompt_lookup_min", "prompt_lookup_max"},
    "suffix": {"suffix_decoding_max_tree_depth", "suffix_decoding_max_cached_requests",
               "suffix_decoding_max_spec_factor", "suffix_decoding_min_token_prob"},
    "draft_model": {"model"},
}


@dataclass(slots=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None  # the draft model's folder (draft_model)
    suffix_decoding_max_tree_depth: int | None = None
    suffix_decoding_max_cached_requests: int | None = None
    suffix_decoding_max_spec_factor: float | None = None
    suffix_decoding_min_token_prob: float | None = None

    @classmethod
    def from_json(cls, text: str) -> SpeculativeConfig:
        """Parse and check the flag's JSON; ValueError says what is wrong."""
        return cls.from_dict(parse_object(text, cls))

    @classmethod
    def from_dict(cls, raw: Any) -> SpeculativeConfig:
        """Check a dict (the JSON, or `LLM(speculative_config=...)`) and fill in vLLM's defaults."""
        raw = check_object(raw, cls)
        method = raw.get("method")
        if method is None and raw.get("model") is not None:
            method = "draft_model"  # vLLM infers the method from a bare draft model
        if method not in _METHOD_FIELDS:
            raise ValueError(f"unknown method {method!r} (choose from {', '.join(_METHOD_FIELDS)})")
        foreign = sorted(set(raw) - _METHOD_FIELDS[method] - {"method", "num_speculative_tokens"})
        if foreign:
            raise ValueError(f"field(s) {foreign} do not apply to method {method!r}")
        values = dict(raw, method=method)
        for name in set(values) & {"prompt_lookup_min", "prompt_lookup_max", "suffix_decoding_max_tree_depth",
                                   "suffix_decoding_max_cached_requests"}:
            if not _is_int(values[name]) or values[name] < 1:
                raise ValueError(f"bad {name}: {values[name]!r} (an integer >= 1)")
        if method == "suffix":
            values.setdefault("suffix_decoding_max_tree_depth", DEFAULT_SUFFIX_TREE_DEPTH)
            # vLLM drafts up to the tree depth; here at most MAX_SPECULATIVE_TOKENS.
            values.setdefault("num_speculative_tokens",
                              min(values["suffix_decoding_max_tree_depth"], MAX_SPECULATIVE_TOKENS))
            for name, low, high in (("suffix_decoding_max_spec_factor", 0.0, float("inf")),
                                    ("suffix_decoding_min_token_prob", 0.0, 1.0)):
                value = values.get(name)
                if value is not None and not (_is_number(value) and low <= value <= high):
                    raise ValueError(f"bad {name}: {value!r} (a number in [{low}, {high}])")
        num = values.get("num_speculative_tokens")
        if num is None:
            raise ValueError(f"method {method!r} needs num_speculative_tokens")
        if not _is_int(num) or not 1 <= num <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"bad num_speculative_tokens: {num!r} (an integer in 1..{MAX_SPECULATIVE_TOKENS})")
        if method == "ngram":
            low, high = values.get("prompt_lookup_min"), values.get("prompt_lookup_max")
            if low is None and high is None:
                low = high = DEFAULT_PROMPT_LOOKUP
            low, high = low if low is not None else high, high if high is not None else low
            if low > high:
                raise ValueError(f"bad prompt_lookup_min: {low} is over prompt_lookup_max {high}")
            values.update(prompt_lookup_min=low, prompt_lookup_max=high)
        if method == "draft_model" and not isinstance(values.get("model"), str):
            raise ValueError("method 'draft_model' needs model, the draft model's folder")
        return cls(**values)

    def check_served(self) -> None:
        """ValueError unless this build serves the method (start-up calls it)."""
        if self.method in NOT_BUILT_METHODS:
            raise ValueError(f"method {self.method!r} is not available in this build (served: "
                             f"{', '.join(SERVED_METHODS)})")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
