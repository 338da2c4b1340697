"""Validate responses against OpenAI's published schemas (tests/schemas/openai).

The file uses OpenAPI 3.1 keywords, plus a few OpenAPI 3.0 `nullable: true`
leftovers that JSON Schema validators ignore (see PROVENANCE.txt). Those are
turned into type lists here, so null passes only where the API sends null.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import jsonschema

SCHEMA_FILE = Path(__file__).parent / "schemas" / "openai" / "openai-api-schemas.json"


def _nullable_to_type_list(node):
    if isinstance(node, list):
        return [_nullable_to_type_list(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_to_type_list(value) for key, value in node.items()}
    if node.pop("nullable", False):
        if "type" in node:
            types = node["type"] if isinstance(node["type"], list) else [node["type"]]
            node["type"] = [*types, "null"]
        if "enum" in node:
            node["enum"] = [*node["enum"], None]
        if "$ref" in node:  # a $ref cannot take a type list: allow null beside it
            node = {"anyOf": [{"$ref": node.pop("$ref")}, {"type": "null"}], **node}
    return node


@functools.cache
def _document() -> dict:
    return _nullable_to_type_list(json.loads(SCHEMA_FILE.read_text()))


def _streamed_completion_schema(document: dict) -> dict:
    """CreateCompletionResponse as streamed: the schema says streamed and whole
    responses share one shape, but like OpenAI's API the server sends
    finish_reason null until a choice ends, and (with include_usage) a last
    chunk whose choices are empty."""
    schema = copy.deepcopy(document["components"]["schemas"]["CreateCompletionResponse"])
    finish = schema["properties"]["choices"]["items"]["properties"]["finish_reason"]
    finish["type"] = ["string", "null"]
    finish["enum"] = [*finish["enum"], None]
    return schema


def _echo_logprobs_schema(document: dict) -> dict:
    """CreateCompletionResponse for echo with logprobs: OpenAI's legacy API
    sends null as the logprob of the first prompt token (nothing precedes it);
    the schema's item types do not allow that null."""
    schema = copy.deepcopy(document["components"]["schemas"]["CreateCompletionResponse"])
    logprobs = schema["properties"]["choices"]["items"]["properties"]["logprobs"]["anyOf"][0]["properties"]
    logprobs["token_logprobs"]["items"] = {"type": ["number", "null"]}
    logprobs["top_logprobs"]["items"] = {"type": ["object", "null"], "additionalProperties": {"type": "number"}}
    return schema


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    document = _document()
    variants = {
        "StreamedCompletionResponse": _streamed_completion_schema,
        "EchoLogprobsCompletionResponse": _echo_logprobs_schema,
    }
    schema = variants[name](document) if name in variants else {"$ref": f"#/components/schemas/{name}"}
    # The schemas' "#/components/..." references resolve against the root.
    return jsonschema.Draft202012Validator({**schema, "components": document["components"]})


def validate(body: dict, name: str) -> None:
    """Raise jsonschema.ValidationError unless `body` fits schema `name`.

    `name` is a schema in the file, or StreamedCompletionResponse /
    EchoLogprobsCompletionResponse (documented variants above).
    """
    _validator(name).validate(body)


def check_error(response) -> dict:
    """The OpenAI error object of an httpx response, validated."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    validate(body, "ErrorResponse")
    return body["error"]
