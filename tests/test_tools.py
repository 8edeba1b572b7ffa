"""Tool calling and reasoning: real chat templates (tests/data/templates), each family's output parsed back, the
forced-call grammar, and tool round trips through the openai SDK against tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mlxllama
from mlxllama import tools as T
from mlxllama.constrain import ll_tokenizer, make_constraint
from mlxllama.errors import UsageError
from mlxllama.server.structured import Plan, StreamSplitter
from conftest import make_hf_folder
from test_serve import serving

TEMPLATES = Path(__file__).parent / "data" / "templates"
LLAMA31 = "meta-llama-Llama-3.1-8B-Instruct.jinja"
QWEN25 = "Qwen-Qwen2.5-7B-Instruct.jinja"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}},
                                       "required": ["utc"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]


def template(name: str) -> str:
    return (TEMPLATES / name).read_text()


@pytest.fixture(scope="module", params=[LLAMA31, QWEN25])
def tiny_family(request, sp_dir, tmp_path_factory):
    """A tiny random model (with room for the templates' long tool prompts) whose tokenizer carries a real model's
    chat template."""
    d = make_hf_folder(tmp_path_factory.mktemp("tools") / "tiny", tokenizer_dir=sp_dir, max_position_embeddings=4096)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template(request.param)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return mlxllama.load(d, backend="numpy")


@pytest.mark.parametrize("name, fam", [(LLAMA31, T.LLAMA3), ("meta-llama-Llama-3.2-3B-Instruct.jinja", T.LLAMA3),
                                       (QWEN25, T.HERMES), ("Qwen-Qwen3-0.6B.jinja", T.HERMES),
                                       ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", T.HERMES),
                                       ("mistralai-Mistral-Nemo-Instruct-2407.jinja", T.MISTRAL)])
def test_family_of_real_templates(name, fam):
    assert T.family(template(name)) == fam


@pytest.mark.parametrize("name", ["Qwen-Qwen3-0.6B.jinja", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
                                  "mistralai-Mistral-Nemo-Instruct-2407.jinja",
                                  "meta-llama-Llama-3.2-3B-Instruct.jinja", LLAMA31, QWEN25])
def test_every_template_renders_calls_and_results_with_our_ids(tiny_hf, name):
    _, tok = mlxllama.load(tiny_hf, backend="numpy")
    tok.chat_template = template(name)
    fam = T.family(tok.chat_template)
    ids = [T.new_id(fam), T.new_id(fam)]
    calls = [{"id": ids[0], "type": "function", "function": {"name": "get_weather",
                                                            "arguments": '{"city": "Tokyo", "days": 3}'}},
             {"id": ids[1], "type": "function", "function": {"name": "get_time", "arguments": '{"utc": true}'}}]
    text = T.render(tok, [{"role": "user", "content": "Weather and time?"},
                          {"role": "assistant", "content": None, "tool_calls": calls},
                          {"role": "tool", "tool_call_id": ids[0], "content": "sunny, 21C"},
                          {"role": "tool", "tool_call_id": ids[1], "content": "12:00"}], TOOLS)
    assert text.index('"Tokyo"') < text.index("sunny, 21C") < text.index("12:00")


@pytest.mark.parametrize("fam, text", [
    (T.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>'),
    (T.LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}; '
               '{"name": "get_time", "parameters": {"utc": true}}'),
    (T.MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, '
                '{"name": "get_time", "arguments": {"utc": true}}]'),
])
def test_parse_each_family(fam, text):
    content, calls = T.parse_tool_calls(text, fam)
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris", "days": 2}),
                                                                  ("get_time", {"utc": True})]
    assert len({c.id for c in calls}) == 2
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls) if fam == T.MISTRAL else True


@pytest.mark.parametrize("fam, text", [(T.HERMES, "<tool_call>\n{not json}\n</tool_call>"),
                                       (T.HERMES, "just words"), (T.LLAMA3, '{"name": 3}'),
                                       (T.LLAMA3, '{"city": "Paris"}'), (T.MISTRAL, "[TOOL_CALLS][{]"),
                                       (T.LLAMA3, '{"name": "f", "parameters": {}} trailing words')])
def test_unparseable_output_is_not_a_call(fam, text):
    assert T.parse_tool_calls(text, fam) is None


def test_forced_call_grammar_accepts_only_the_family_format(tiny_family):
    model, tok = tiny_family
    fam = T.family(tok.chat_template)
    good = {T.HERMES: '<tool_call>\n{"name": "get_time", "arguments": {"utc": false}}\n</tool_call>',
            T.LLAMA3: '{"name": "get_time", "parameters": {"utc": false}}'}[fam]
    named = {"type": "function", "function": {"name": "get_time"}}
    c = make_constraint(tok, model.args.vocab_size, tools=TOOLS, tool_choice=named)
    spell = ll_tokenizer(tok).greedy_tokenize  # no sentencepiece dummy prefix
    ids = spell(good)
    assert c.check_draft(ids) == len(ids)
    wrong = good.replace("get_time", "get_weather")
    assert make_constraint(tok, model.args.vocab_size, tools=TOOLS, tool_choice=named).check_draft(
        spell(wrong)) < len(spell(wrong))
    with pytest.raises(UsageError, match="not among the tools"):
        make_constraint(tok, model.args.vocab_size, tools=TOOLS, tool_choice={"function": {"name": "nope"}})


def test_tool_results_and_parallel_calls_render_into_the_next_turn(tiny_family):
    _, tok = tiny_family
    calls = [{"id": "call_a", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Tokyo", "days": 3}'}},
             {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"utc": true}'}}]
    messages = [{"role": "user", "content": "Weather and time?"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_a", "content": "sunny, 21C"},
                {"role": "tool", "tool_call_id": "call_b", "content": "12:00"}]
    text = T.render(tok, messages, TOOLS)
    assert "get_weather" in text and '"Tokyo"' in text and "sunny, 21C" in text and "12:00" in text
    assert text.index('"Tokyo"') < text.index("sunny, 21C")  # the call, then its result
    assert '"description": "The weather in a city"' in text  # the tools, rendered by the template itself


def test_reasoning_split_whole_and_streamed():
    assert T.split_reasoning("<think>\nhmm, 2+2\n</think>\n\nIt is 4.") == ("hmm, 2+2", "It is 4.")
    assert T.split_reasoning("plain answer") == (None, "plain answer")
    assert T.split_reasoning("hmm</think>4", open_in_prompt=True) == ("hmm", "4")
    text = "<think>\nhmm, 2+2\n</think>\n\nIt is 4."
    for size in (1, 3, 7):
        split = StreamSplitter(Plan(reasoning=True))
        deltas = [d for i in range(0, len(text), size) for d in split.feed(text[i:i + size])]
        deltas += split.close("stop")[0]
        reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
        content = "".join(d.get("content", "") for d in deltas)
        assert (reasoning.strip(), content) == ("hmm, 2+2", "It is 4.")


def test_streamed_calls_get_one_index_each():
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>')
    split = StreamSplitter(Plan(family=T.HERMES, tools=True))
    deltas = [d for i in range(0, len(text), 5) for d in split.feed(text[i:i + 5])]
    assert deltas == []  # held back until the end
    deltas, finish = split.close("stop")
    assert finish == "tool_calls"
    assert [d["tool_calls"][0]["index"] for d in deltas] == [0, 0, 1, 1]
    split = StreamSplitter(Plan(family=T.HERMES, tools=True))
    assert [d for d in split.feed("Hello there") if "content" in d] == [{"content": "Hello there"}]
    both = ". " + text
    deltas = [d for i in range(0, len(both), 4) for d in split.feed(both[i:i + 4])]
    deltas += split.close("stop")[0]
    assert "".join(d.get("content", "") for d in deltas) == ". "  # text before the calls streams as content
    assert [d["tool_calls"][0]["index"] for d in deltas if "tool_calls" in d] == [0, 0, 1, 1]


def _round_trip(client, stream: bool, seed: int, **kw):
    """One assistant turn through the SDK: (content, [(index, id, name, arguments)], finish_reason)."""
    args = dict(model="tiny", tools=TOOLS, max_tokens=600, temperature=1.0, seed=seed, **kw)
    if not stream:
        r = client.chat.completions.create(**args)
        m = r.choices[0].message
        calls = [(i, c.id, c.function.name, c.function.arguments) for i, c in enumerate(m.tool_calls or [])]
        return m.content, calls, r.choices[0].finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **args):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for c in d.tool_calls or []:
            got = calls.setdefault(c.index, [c.index, None, "", ""])
            got[1] = c.id or got[1]
            got[2] += (c.function.name or "") if c.function else ""
            got[3] += (c.function.arguments or "") if c.function else ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [tuple(v) for _, v in sorted(calls.items())], finish


@pytest.mark.parametrize("stream", [False, True])
def test_tools_round_trip_through_the_openai_sdk(tiny_family, stream):
    """call (forced: the tiny model is random) -> tool results -> final answer; two parallel calls in one turn
    get indexes 0 and 1."""
    openai = pytest.importorskip("openai")
    model, tok = tiny_family
    with serving(model, tok) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        user = [{"role": "user", "content": "What is the weather in Paris, and the time?"}]
        parallel = None
        for seed in range(12):  # the random model ends after one call or goes on to a second one
            content, calls, finish = _round_trip(client, stream, seed, messages=user, tool_choice="required")
            assert finish == "tool_calls" and calls
            assert [c[0] for c in calls] == list(range(len(calls)))
            for _, cid, name, arguments in calls:
                assert cid and name in ("get_weather", "get_time") and isinstance(json.loads(arguments), dict)
            if len(calls) >= 2:
                parallel = calls
                break
        assert parallel is not None, "no seed gave two calls in one turn"
        turn = [{"role": "assistant", "content": None,
                 "tool_calls": [{"id": cid, "type": "function", "function": {"name": n, "arguments": a}}
                                for _, cid, n, a in parallel]}]
        results = [{"role": "tool", "tool_call_id": cid, "content": f"result of {n}"} for _, cid, n, _ in parallel]
        content, calls, finish = _round_trip(client, stream, 0, messages=user + turn + results,
                                             tool_choice="none", max_completion_tokens=8)
        assert finish in ("stop", "length") and not calls and isinstance(content, str)
        named = {"type": "function", "function": {"name": "get_weather"}}
        _, calls, finish = _round_trip(client, stream, 1, messages=user, tool_choice=named,
                                       parallel_tool_calls=False)
        assert finish == "tool_calls" and [c[2] for c in calls] == ["get_weather"]
        assert json.loads(calls[0][3])["city"] in ("Paris", "Tokyo")


def test_auto_tool_choice_returns_unparseable_output_as_content(tiny_family):
    openai = pytest.importorskip("openai")
    model, tok = tiny_family
    with serving(model, tok) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for stream in (False, True):
            content, calls, finish = _round_trip(client, stream, 3, messages=[{"role": "user", "content": "hi"}],
                                                 tool_choice="auto", max_completion_tokens=6)
            assert finish in ("length", "stop") and not calls and isinstance(content, str)


def test_broken_calls_come_back_as_content_whole_and_streamed():
    from mlxllama.server.structured import message

    text = '<tool_call>\n{"name": "get_time", "arguments": {"utc": tru\n</tool_call>'
    plan = Plan(family=T.HERMES, tools=True)
    msg, finish = message(text, plan, "stop")
    assert msg == {"role": "assistant", "content": text} and finish == "stop"
    split = StreamSplitter(plan)
    deltas = [d for i in range(0, len(text), 6) for d in split.feed(text[i:i + 6])]
    more, finish = split.close("stop")
    assert "".join(d.get("content", "") for d in deltas + more) == text and finish == "stop"
    msg, finish = message('{"name": "get_time", "parameters": {"utc": true}}', Plan(family=T.LLAMA3, tools=True),
                          "stop")
    assert msg["content"] is None and msg["tool_calls"][0]["function"]["name"] == "get_time"
    assert finish == "tool_calls"
