"""`--speculative-config`: vLLM's SpeculativeConfig JSON, the same field names.

    {"method": "ngram", "num_speculative_tokens": 4,
     "prompt_lookup_min": 2, "prompt_lookup_max": 5}

`ngram`, `draft_model` and `suffix` are served (`suffix` when
arctic-inference is installed: `make arctic-inference`); a draft model is
also checked against the target at start-up (draft_check.py); any other
method is unknown. Plain data (no torch): it travels to the front end
inside the engine config.

`disable_by_batch_size` (any method, as in vLLM): no request speculates in a
step that starts with at least that many requests running, where verifying
drafts costs compute a large batch no longer has to spare.

Invariant: a parsed config is valid for its method: 1 <= num_speculative_tokens
<= MAX_SPECULATIVE_TOKENS; disable_by_batch_size, where given, >= 2; for ngram, 1 <= prompt_lookup_min <=
prompt_lookup_max; for suffix, every suffix_decoding_* field is set (vLLM's
defaults), the tree depth >= 1, the cached requests >= 0, the spec factor
>= 0 and the token probability in [0, 1]; fields of another method are
refused, not ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inference.json_config import check_object, parse_object

MAX_SPECULATIVE_TOKENS = 16
# vLLM's defaults where the JSON leaves them out.
DEFAULT_PROMPT_LOOKUP = 5
DEFAULT_SUFFIX_TREE_DEPTH = 24
DEFAULT_SUFFIX_CACHED_REQUESTS = 10000
DEFAULT_SUFFIX_SPEC_FACTOR = 1.0
DEFAULT_SUFFIX_MIN_TOKEN_PROB = 0.1

# method -> the fields it takes besides `method` and `num_speculative_tokens`
_METHOD_FIELDS = {
    "ngram": {"prompt_lookup_min", "prompt_lookup_max"},
    "suffix": {"suffix_decoding_max_tree_depth", "suffix_decoding_max_cached_requests",
               "suffix_decoding_max_spec_factor", "suffix_decoding_min_token_prob"},
    "draft_model": {"model"},
}
_COMMON_FIELDS = {"method", "num_speculative_tokens", "disable_by_batch_size"}


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
    disable_by_batch_size: int | None = None

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
        foreign = sorted(set(raw) - _METHOD_FIELDS[method] - _COMMON_FIELDS)
        if foreign:
            raise ValueError(f"field(s) {foreign} do not apply to method {method!r}")
        values = dict(raw, method=method)
        batch = values.get("disable_by_batch_size")
        if batch is not None and (not _is_int(batch) or batch < 2):
            raise ValueError(f"bad disable_by_batch_size: {batch!r} (an integer >= 2)")
        for name in set(values) & {"prompt_lookup_min", "prompt_lookup_max", "suffix_decoding_max_tree_depth"}:
            if not _is_int(values[name]) or values[name] < 1:
                raise ValueError(f"bad {name}: {values[name]!r} (an integer >= 1)")
        if method == "suffix":
            cached = values.setdefault("suffix_decoding_max_cached_requests", DEFAULT_SUFFIX_CACHED_REQUESTS)
            # 0, as in vLLM: no cache of earlier responses, each request drafts from its own tokens only.
            if not _is_int(cached) or cached < 0:
                raise ValueError(f"bad suffix_decoding_max_cached_requests: {cached!r} (an integer >= 0)")
            values.setdefault("suffix_decoding_max_tree_depth", DEFAULT_SUFFIX_TREE_DEPTH)
            values.setdefault("suffix_decoding_max_spec_factor", DEFAULT_SUFFIX_SPEC_FACTOR)
            values.setdefault("suffix_decoding_min_token_prob", DEFAULT_SUFFIX_MIN_TOKEN_PROB)
            # vLLM drafts up to the tree depth; here at most MAX_SPECULATIVE_TOKENS.
            values.setdefault("num_speculative_tokens",
                              min(values["suffix_decoding_max_tree_depth"], MAX_SPECULATIVE_TOKENS))
            for name, low, high in (("suffix_decoding_max_spec_factor", 0.0, float("inf")),
                                    ("suffix_decoding_min_token_prob", 0.0, 1.0)):
                value = values[name]
                if not (_is_number(value) and low <= value <= high):
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
        if self.method == "suffix" and not suffix_decoding_installed():
            raise ValueError("method 'suffix' needs arctic-inference, which is not installed "
                             "(`make arctic-inference` builds it)")


def suffix_decoding_installed() -> bool:
    """Whether arctic-inference's suffix trees import (built by `make arctic-inference`, not a dependency)."""
    try:
        import arctic_inference.suffix_decoding  # noqa: F401
    except ImportError:
        return False
    return True


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
