"""Grammar-constrained decoding in the engine: outputs match their spec, free
rows of a mixed batch are untouched, a request waiting for its grammar holds
no batch slot, a dead-end grammar ends the request cleanly, and so do a
grammar that fails to compile and an abort while the grammar compiles."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from ci_tools import require_module
from conftest import build_tiny_tokenizer

from inference import LLM, SamplingParams, StructuredOutputsParams
from inference.block_manager import BlockManager
from inference.config import SchedulerConfig
from inference.core_protocol import AddRequest, SampleOutput
from inference.request import Request, RequestStatus
from inference.sampler import Sampler, SamplingRow
from inference.scheduler import Scheduler

# The GPU check runs this file where only torch, transformers and pytest are
# installed: without xgrammar it skips (fails on CI), and jsonschema is imported where used.
xgr = require_module("xgrammar", "pip install xgrammar (make install does)")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLM(model=str(smollm2_dir), dtype="float32", num_kv_blocks=256, max_model_len=512)


def chat(llm, text: str) -> str:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)


def structured(max_tokens=64, **spec) -> SamplingParams:
    temperature = spec.pop("temperature", 0.0)
    return SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=spec.pop("seed", None),
                          n=spec.pop("n", 1), logprobs=spec.pop("logprobs", None), structured_outputs=StructuredOutputsParams(**spec))


@pytest.mark.parametrize("spec, message", [
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": {"type": "nonsense"}}, "invalid json"),
    ({"regex": "(unclosed"}, "invalid regex"),
    ({"grammar": "root ::= undefined_rule"}, "invalid grammar"),
])
def test_bad_specs_are_refused_before_compiling(spec, message):
    from inference.structured_output import check_structured_outputs

    with pytest.raises(ValueError, match=message):
        check_structured_outputs(StructuredOutputsParams(**spec))


@pytest.mark.parametrize("kwargs", [{}, {"json": "{}", "regex": "a"}, {"choice": []}, {"choice": ["a", ""]}])
def test_exactly_one_spec(kwargs):
    with pytest.raises(ValueError):
        StructuredOutputsParams(**kwargs)


def test_outputs_follow_their_spec_greedy_and_sampled(llm):
    import jsonschema

    prompt = chat(llm, "Describe a person as JSON.")
    ebnf = 'root ::= "color: " ("red" | "green" | "blue")'
    params = [
        structured(json=PERSON),
        structured(json=PERSON, temperature=1.0, seed=3, n=2),
        structured(json_object=True, max_tokens=96),
        structured(regex=r"\d{3}-[a-z]{2,6}", temperature=1.0, seed=5),
        structured(choice=["yes", "no", "maybe so"], temperature=1.0, n=3),
        structured(grammar=ebnf, temperature=1.0, seed=7),
    ]
    outputs = llm.generate([prompt] * len(params), params, use_tqdm=False)
    texts = [[c.text for c in o.outputs] for o in outputs]
    # A free JSON object may outgrow max_tokens; every bounded spec ends.
    assert all(c.finish_reason == "stop" for i, o in enumerate(outputs) if i != 2 for c in o.outputs), texts
    for text in texts[0] + texts[1]:
        jsonschema.validate(json.loads(text), PERSON)
    if outputs[2].outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(texts[2][0]), dict)
    assert texts[2][0].startswith("{")
    assert re.fullmatch(r"\d{3}-[a-z]{2,6}", texts[3][0])
    assert set(texts[4]) <= {"yes", "no", "maybe so"}
    assert re.fullmatch("color: (red|green|blue)", texts[5][0])


def test_compile_time_is_reported_once_per_grammar(llm):
    prompt = chat(llm, "Pick one.")
    spec = {"choice": ["left", "right", "compile-time-test"]}
    first, second = (llm.generate([prompt], structured(**spec), use_tqdm=False)[0] for _ in range(2))
    assert first.metrics.grammar_compile_time is not None and first.metrics.grammar_compile_time > 0
    assert second.metrics.grammar_compile_time is None  # served from the cache
    assert first.outputs[0].text == second.outputs[0].text


def test_free_requests_in_a_mixed_batch_get_exactly_their_tokens_alone(llm):
    import jsonschema

    prompts = [chat(llm, "Write a short poem about the sea."), "The capital of France is"]
    free = [SamplingParams(temperature=0.0, max_tokens=24, logprobs=2),
            SamplingParams(temperature=0.0, max_tokens=24, n=2, ignore_eos=True)]
    alone = llm.generate(prompts, free, use_tqdm=False)
    mixed = llm.generate(
        [prompts[0], chat(llm, "Describe a person as JSON."), prompts[1], prompts[0]],
        [free[0], structured(json=PERSON, temperature=1.0, n=2, seed=1), free[1],
         structured(regex="[a-z ]{10,30}", max_tokens=24, logprobs=2)],
        use_tqdm=False,
    )
    for solo, together in zip(alone, [mixed[0], mixed[2]]):
        for a, b in zip(solo.outputs, together.outputs):
            assert a.token_ids == b.token_ids
            # Another batch shape may round the forward differently; the mask itself adds nothing.
            for pa, pb in zip(a.logprobs or [], b.logprobs or []):
                assert pa.keys() == pb.keys()
                assert all(abs(pa[t].logprob - pb[t].logprob) < 1e-4 for t in pa)
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), PERSON)


def test_a_dead_end_grammar_ends_the_request_and_frees_its_blocks(llm):
    # After "yes" only EOS continues the grammar, and min_tokens bans EOS.
    params = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=8,
                            structured_outputs=StructuredOutputsParams(choice=["yes"]))
    [out] = llm.generate([chat(llm, "Say yes.")], params, use_tqdm=False)
    assert out.outputs[0].finish_reason == "grammar"
    assert out.outputs[0].text == "yes"
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.core.block_manager.num_used_blocks == 0  # blocks it cached for a prefix are free too


class _Matcher:
    """Accepts anything; stands in for xgrammar's matcher in scheduler tests."""

    def accept_token(self, token_id: int) -> bool:
        return True

    def is_terminated(self) -> bool:
        return False


def test_a_request_waiting_for_its_grammar_holds_no_batch_slot():
    config = SchedulerConfig(1, 32, max_model_len=64, block_size=4, enable_prefix_caching=False)
    scheduler = Scheduler(config, BlockManager(16, 4, False))
    params = SamplingParams(max_tokens=2, structured_outputs=StructuredOutputsParams(regex="a"))
    waiting = Request("s", "s", 0, [1, 2, 3], params, (0,), 0.0, status=RequestStatus.WAITING_FOR_GRAMMAR)
    free = Request("f", "f", 0, [4, 5], SamplingParams(max_tokens=1), (0,), 1.0)
    scheduler.add_request(waiting)
    scheduler.add_request(free)
    assert scheduler.num_waiting == 2
    out = scheduler.schedule()
    assert [r.request_id for r, _ in out.scheduled] == ["f"]  # max_num_seqs is 1: "s" takes no seat
    assert waiting.block_table == []
    scheduler.update(out, {"f": [7]})
    scheduler.grammar_ready("s", _Matcher)
    out = scheduler.schedule()
    assert [r.request_id for r, _ in out.scheduled] == ["s"] and isinstance(waiting.grammar, _Matcher)
    scheduler.finish_request("s", RequestStatus.FINISHED_ABORTED)
    assert not scheduler.has_unfinished() and scheduler.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_sampler_masks_only_the_constrained_rows(tmp_path, device):
    from transformers import AutoTokenizer

    build_tiny_tokenizer(tmp_path)  # byte-level: 256 byte tokens and <eos>
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    vocab = len(tokenizer)
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)).compile_regex("7+")
    allowed = {t for t in range(vocab) if re.fullmatch("7+", tokenizer.decode([t]))}
    torch.manual_seed(0)
    logits = torch.randn(4, vocab, device=device)
    rows = [SamplingRow(f"r{i}", SamplingParams(temperature=0.0, logprobs=1), [1], [], (0,),
                        grammar=xgr.GrammarMatcher(compiled) if i % 2 else None) for i in range(4)]
    out = Sampler(device)(logits.clone(), rows)
    free_alone = Sampler(device)(logits[0::2].clone(), [rows[0], rows[2]])
    assert out.token_ids[0::2] == free_alone.token_ids
    assert out.logprobs[0::2] == free_alone.logprobs
    assert {out.token_ids[1], out.token_ids[3]} <= allowed
    assert out.token_ids[1] == max(allowed, key=lambda t: logits[1, t].item())


def test_a_grammar_that_fails_to_compile_after_validation_aborts_its_request(llm, caplog):
    """The core trusts its caller to have checked a spec (`check_structured_outputs`).
    One that fails to compile anyway (here one the check would refuse, handed
    straight to the core) ends its own request as aborted, and nothing else."""
    core = llm.engine.core
    prompt = llm.tokenizer.encode(chat(llm, "Say something."))
    bad = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(grammar="root ::= undefined_rule"))
    core.add_request(AddRequest("bad-grammar", prompt, bad, time.monotonic()))
    core.add_request(AddRequest("free", prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                                time.monotonic()))
    outputs = []
    while core.has_unfinished_requests():
        assert len(outputs) < 100, "the request with the failed grammar never ended"
        outputs += core.step().outputs
    assert [o for o in outputs if o.request_id == "bad-grammar"] == [SampleOutput("bad-grammar", 0, [],
                                                                                  finish_reason="abort")]
    free = [o for o in outputs if o.request_id == "free"]
    assert sum(len(o.new_token_ids) for o in free) == 4 and free[-1].finish_reason == "length"
    assert "grammar compile failed for bad-grammar" in caplog.text
    assert not core.compiling and core.stats().num_free_blocks == core.stats().num_total_blocks


def test_a_request_aborted_while_its_grammar_compiles(llm):
    engine = llm.engine
    # A schema no other test compiles, so its compile starts here and takes a while (SmolLM2's 49k tokens).
    people = {"type": "array", "items": PERSON, "minItems": 1, "maxItems": 1}
    schema = {"type": "object", "properties": {"aborted_while_compiling": people},
              "required": ["aborted_while_compiling"], "additionalProperties": False}
    params = structured(json=schema, max_tokens=128)
    prompt = chat(llm, "Describe some people as JSON.")
    engine.add_request("aborted", prompt, params)
    future, _ = engine.core.compiling["aborted"]
    assert not future.done()
    engine.abort_request("aborted")
    outputs, num_steps = [], 0
    while engine.has_unfinished_requests():
        num_steps += 1
        assert num_steps < 100, "the aborted request never ended"
        outputs += engine.step()
    assert [(o.request_id, o.outputs[0].finish_reason, o.outputs[0].token_ids) for o in outputs] == [
        ("aborted", "abort", [])]
    # The compile went on; the next request with the schema gets it from the cache.
    future.result(timeout=60)
    [again] = llm.generate([prompt], params, use_tqdm=False)
    assert again.metrics.grammar_compile_time is None
    assert again.outputs[0].finish_reason == "stop"
    assert len(json.loads(again.outputs[0].text)["aborted_while_compiling"]) == 1
    assert not engine.core.compiling and engine.stats().num_free_blocks == engine.stats().num_total_blocks
