"""Structured outputs over HTTP with the official `openai` client: parsed
pydantic models for 20 schemas (greedy and 5 seeds sampled), regex and
choice, the grammar dead end, metrics. One server for the module; requests
run concurrently so the batch stays full."""

from __future__ import annotations

import asyncio
import re
from enum import Enum
from typing import Annotated, Literal

import httpx
import jsonschema
import openai
import pytest
from openai.lib._pydantic import to_strict_json_schema
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field
from server_fixtures import API_KEY, STRUCTURED_SERVER_ARGS, shared_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
SEEDS = range(5)
Name = Field(max_length=24)
ShortStr = Annotated[str, Field(max_length=24)]  # strings are bounded, so sampled output always ends


class Color(str, Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class City(BaseModel):
    name: str = Name
    population: int = Field(ge=0, le=50_000_000)


class Person(BaseModel):
    name: str = Name
    age: int = Field(ge=0, le=120)


class Address(BaseModel):
    street: str = Name
    city: str = Name
    zip_code: str = Field(pattern=r"^\d{5}$")


class PersonWithAddress(BaseModel):
    person: Person
    address: Address


class Team(BaseModel):
    name: str = Name
    members: list[Person] = Field(max_length=3)


class Paint(BaseModel):
    color: Color
    glossy: bool


class Rating(BaseModel):
    stars: int = Field(ge=1, le=5)
    verdict: Literal["good", "bad", "meh"]


class Point(BaseModel):
    x: int = Field(ge=-100, le=100)
    y: int = Field(ge=-100, le=100)


class Polygon(BaseModel):
    points: list[Point] = Field(min_length=3, max_length=4)


class Book(BaseModel):
    title: str = Name
    year: int = Field(ge=1400, le=2030)
    subtitle: str | None = Field(default=None, max_length=24)


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int = Field(ge=1, le=9)


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool


class Pet(BaseModel):
    pet: Cat | Dog


class Tags(BaseModel):
    tags: list[Literal["fun", "work", "home"]] = Field(max_length=3)


class Temperature(BaseModel):
    unit: Literal["c", "f"]
    value: int = Field(ge=-50, le=150)


class Flags(BaseModel):
    enabled: bool
    beta: bool
    level: Literal[1, 2, 3]


class Meeting(BaseModel):
    title: str = Name
    attendees: list[ShortStr] = Field(max_length=3)
    minutes: int = Field(ge=5, le=240)


class Inventory(BaseModel):
    item: str = Name
    count: int = Field(ge=0, le=1000)
    location: City | None = None


class Country(BaseModel):
    name: str = Name
    capital: City
    colors: list[Color] = Field(max_length=3)


class Answer(BaseModel):
    answer: Literal["yes", "no"] | int = Field(union_mode="left_to_right")


class Version(BaseModel):
    major: int = Field(ge=0, le=99)
    minor: int = Field(ge=0, le=99)
    label: str = Field(pattern=r"^[a-z]{1,8}$")


SCHEMAS = [City, Person, PersonWithAddress, Team, Paint, Rating, Polygon, Book, Pet, Tags, Temperature,
           Flags, Meeting, Inventory, Country, Answer, Version, Address, Point, Cat]


@pytest.fixture(scope="module")
def server():
    return shared_server(*STRUCTURED_SERVER_ARGS)


def run(coroutine):
    return asyncio.run(coroutine)


async def _parse(client, model: type[BaseModel], seed: int | None):
    completion = await client.chat.completions.parse(
        model=MODEL, max_tokens=160, response_format=model,
        temperature=0.0 if seed is None else 1.0, seed=seed,
        messages=[{"role": "system", "content": "You answer with JSON only."},
                  {"role": "user", "content": f"Give an example of a {model.__name__}."}],
    )
    return model, completion


def test_parse_returns_a_valid_object_for_20_schemas_greedy_and_sampled(server):
    jobs = [(model, seed) for model in SCHEMAS for seed in [None, *SEEDS]]

    async def all_jobs():
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=600)
        async with client:
            return await asyncio.gather(*(_parse(client, m, s) for m, s in jobs), return_exceptions=True)

    assert len(SCHEMAS) >= 20
    results = run(all_jobs())
    failures = [(job, r) for job, r in zip(jobs, results) if isinstance(r, BaseException)]
    assert not failures, failures
    for model, completion in results:
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", (model.__name__, choice.message.content)
        assert isinstance(choice.message.parsed, model)
        jsonschema.validate(choice.message.parsed.model_dump(mode="json"), to_strict_json_schema(model))


def test_regex_and_choice_always_match(server):
    def body(seed, **extra):
        return {"model": MODEL, "max_tokens": 24, "temperature": 1.0, "seed": seed, **extra}

    requests = []
    for seed in SEEDS:
        requests += [
            ("/v1/completions", body(seed, prompt="My phone number is", guided_regex=r"\d{3}-\d{4}"), r"\d{3}-\d{4}"),
            ("/v1/completions", body(seed, prompt="The answer:", structured_outputs={"choice": ["yes", "no"]}),
             "yes|no"),
            ("/v1/chat/completions", body(seed, messages=[{"role": "user", "content": "A hex color?"}],
                                          structured_outputs={"regex": "#[0-9a-f]{6}"}), "#[0-9a-f]{6}"),
            ("/v1/chat/completions", body(seed, messages=[{"role": "user", "content": "Pick a fruit."}],
                                          guided_choice=["apple", "banana split", "kiwi"]), "apple|banana split|kiwi"),
        ]

    async def post_all():
        async with server.async_client() as http:
            return await asyncio.gather(*(http.post(path, json=b) for path, b, _ in requests))

    for (path, _, pattern), response in zip(requests, run(post_all())):
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        text = choice["text"] if path == "/v1/completions" else choice["message"]["content"]
        assert re.fullmatch(pattern, text), (pattern, text)
        assert choice["finish_reason"] == "stop"


def test_a_dead_end_grammar_reports_it_and_the_server_stays_healthy(server):
    with server.client() as http:
        # After "yes" only EOS continues the grammar, and min_tokens bans EOS.
        response = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Say yes."}], "max_tokens": 16, "min_tokens": 8,
            "guided_choice": ["yes"]})
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert (choice["finish_reason"], choice["stop_reason"], choice["message"]["content"]) == ("stop", "grammar", "yes")
        assert http.get("/health").status_code == 200


def _structured_counts(server) -> tuple[float, float]:
    """(regex requests finished, grammar compiles observed) as /metrics reports them."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    samples = {(s.name, s.labels.get("kind")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return (samples.get(("pagedinfer_structured_requests_total", "regex"), 0.0),
            samples[("pagedinfer_grammar_compile_seconds_count", None)])


def test_metrics_count_structured_requests_and_compile_time(server):
    # The server is shared with other modules: compare counts before and after.
    counts = [_structured_counts(server)]
    with server.client() as http:
        for _ in range(2):  # a regex no other test uses: compiled once, then from the cache
            response = http.post("/v1/completions",
                                 json={"prompt": "x", "max_tokens": 4, "guided_regex": "metrics[0-9]"})
            assert response.status_code == 200, response.text
            counts.append(_structured_counts(server))
    assert counts[1] == (counts[0][0] + 1, counts[0][1] + 1)
    assert counts[2] == (counts[0][0] + 2, counts[0][1] + 1)
