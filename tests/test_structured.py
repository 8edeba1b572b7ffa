"""Structured output: llguidance constraints over our tokenizers, the schema holding on the real SmolLM2 model through
the Python API, the engine's batch, the CLI and the server (the openai SDK's parse, streamed and not)."""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional

import pytest
from pydantic import BaseModel, Field

import mlxllama
from mlxllama.constrain import ll_tokenizer, make_constraint
from mlxllama.engine import Engine, RequestParams
from mlxllama.errors import UsageError
from mlxllama.sampling import SamplingParams
from test_serve import serving


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=40)
    zip_code: Optional[str] = Field(max_length=10)  # anyOf string / null


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=120)
    favorite_color: Color  # an enum, through $ref
    address: Address  # a nested object, through $ref
    hobbies: list[Literal["chess", "golf", "music", "cooking"]] = Field(min_length=1, max_length=3)


@pytest.fixture(scope="module")
def smol(smollm2):
    return mlxllama.load(smollm2, backend="numpy")


def test_llguidance_tokenizer_spells_each_token_as_ours(smol, tiny_hf):
    _, tok = smol
    text = 'Ünïcödé {"a": [1, 2.5e3], "b": "日本語 🙂"}\n\tend'
    ids = tok.encode(text, add_special_tokens=False)
    assert ll_tokenizer(tok).decode_bytes(ids) == text.encode()
    assert ll_tokenizer(tok) is ll_tokenizer(tok)  # built once per tokenizer
    _, sp = mlxllama.load(tiny_hf, backend="numpy")
    ids = sp.encode(text, add_special_tokens=False)
    assert ll_tokenizer(sp).decode_bytes(ids).decode() == " " + sp.decode(ids)  # sentencepiece's dummy prefix


def test_schema_holds_on_smollm2_sampled(smol):
    model, tok = smol
    schema = Person.model_json_schema()
    assert "$defs" in schema and "anyOf" in json.dumps(schema)
    for seed in range(2):
        out = mlxllama.generate(model, tok, f"Invent person number {seed}. Answer in JSON.", max_tokens=300,
                                chat=True, json_schema=schema, temperature=1.0, seed=seed)
        Person.model_validate_json(out)


def test_response_format_json_object_and_lark_grammar(smol):
    model, tok = smol
    # json_object bounds nothing (no schema), so a looping small model can fill max_tokens: ask for a short one
    out = mlxllama.generate(model, tok, 'What is 2+2? Answer as a JSON object with the key "answer".', max_tokens=200,
                            chat=True, response_format={"type": "json_object"}, temperature=0.8, seed=0)
    assert isinstance(json.loads(out), dict)
    out = mlxllama.generate(model, tok, "Is the sky blue? Answer yes or no.", max_tokens=10, chat=True,
                            grammar='start: ("yes" | "no") "."')
    assert out in ("yes.", "no.")


def test_schemas_that_do_not_compile_say_why(smol):
    model, tok = smol
    with pytest.raises(UsageError, match="does not compile.*nope"):
        make_constraint(tok, model.args.vocab_size, json_schema={"properties": {"a": {"$ref": "#/$defs/nope"}}})
    with pytest.raises(UsageError, match="unknown name"):
        make_constraint(tok, model.args.vocab_size, grammar="start: missing_rule")
    with pytest.raises(UsageError, match="json_object"):
        make_constraint(tok, model.args.vocab_size, response_format={"type": "xml"})
    assert make_constraint(tok, model.args.vocab_size, response_format={"type": "text"}) is None


def test_each_request_in_a_batch_keeps_its_own_matcher(smol):
    """Three requests decode in one batch: a schema, a grammar and free text; each ends as its constraint says."""
    model, tok = smol
    vocab = model.args.vocab_size
    engine = Engine(model, tok, max_batch=4)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me about Paris."}]))
    grammar = make_constraint(tok, vocab, grammar='start: "Paris is " ("big" | "old") "."')
    schema = make_constraint(tok, vocab, json_schema={"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"], "additionalProperties": False})
    handles = [engine.submit(ids, RequestParams(max_tokens=40, constraint=c)) for c in (grammar, schema, None)]
    while engine.step():
        pass
    outs = [_drain(h) for h in handles]
    assert outs[0][0] in ("Paris is big.", "Paris is old.") and outs[0][1] == "stop"
    assert set(json.loads(outs[1][0])) == {"n"} and outs[1][1] == "stop"
    assert outs[2][1] in ("stop", "length")


def _drain(handle) -> tuple[str, str]:
    text, finish = [], None
    while not handle._events.empty():
        ev = handle._events.get_nowait()
        text.append(ev.text)
        finish = ev.finish_reason or finish
    return "".join(text), finish


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxllama_cli.app", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_json_schema_and_grammar_files(smollm2, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                                                   "why": {"type": "string", "maxLength": 30}},
                                  "required": ["answer", "why"], "additionalProperties": False}))
    r = _cli("generate", "Is water wet?", "-m", str(smollm2), "--json-schema", str(schema), "-q", "--backend",
             "numpy", "--temp", "0.7", "--seed", "1", "--max-tokens", "100")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["answer"] in ("yes", "no")
    bad = tmp_path / "bad.lark"
    bad.write_text("start: nothing_here\n")
    r = _cli("generate", "hi", "-m", str(smollm2), "--grammar", str(bad), "-q", "--backend", "numpy")
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "does not compile" in r.stderr


def test_openai_sdk_parse_streamed_and_not_with_8_in_flight(smol):
    openai = pytest.importorskip("openai")
    model, tok = smol
    prompts = [f"Invent a person who {x}. Answer in JSON." for x in
               ("likes chess", "is a pilot", "bakes bread", "sails boats", "keeps bees", "sings", "paints", "runs")]
    with serving(model, tok, max_batch=8) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)

        def ask(i):
            messages = [{"role": "user", "content": prompts[i]}]
            if i % 2:
                with client.chat.completions.stream(model="tiny", messages=messages, response_format=Person,
                                                     seed=i) as s:
                    for _ in s:
                        pass
                    return s.get_final_completion().choices[0].message.parsed
            return client.chat.completions.parse(model="tiny", messages=messages, response_format=Person,
                                                 seed=i).choices[0].message.parsed

        with ThreadPoolExecutor(8) as ex:
            parsed = list(ex.map(ask, range(len(prompts))))
        assert all(isinstance(p, Person) for p in parsed)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                           response_format={"type": "json_object"}, max_tokens=300, seed=3,
                                           temperature=0.7)
        if r.choices[0].finish_reason == "stop":  # any object: nothing bounds it, it may run past max_tokens
            assert isinstance(json.loads(r.choices[0].message.content), dict)
        assert r.choices[0].message.content.startswith("{")
        with pytest.raises(openai.BadRequestError, match="does not compile"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "x", "schema": {"$ref": "#/$defs/missing"}}})
        numbers = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 3,
                   "maxItems": 3}
        r = client.completions.create(model="tiny", prompt="A JSON list of three numbers:", max_tokens=60, seed=0,
                                      extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                          "name": "n", "schema": numbers}}})
        assert len(json.loads(r.choices[0].text)) == 3


def test_llm_cli_against_the_server(tiny_hf, tmp_path):
    """Simon Willison's `llm`, with the server as an OpenAI-compatible model: a prompt and a --schema prompt."""
    pytest.importorskip("llm")
    llm = [sys.executable, "-m", "llm"]
    model, tok = mlxllama.load(tiny_hf, backend="numpy")
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    with serving(model, tok) as (url, _):
        (tmp_path / "extra-openai-models.yaml").write_text(textwrap.dedent(f"""\
            - model_id: tiny
              model_name: tiny
              api_base: "{url}/v1"
              api_key_name: tiny
              supports_schema: true
            """))
        (tmp_path / "keys.json").write_text(json.dumps({"tiny": "x"}))
        env = dict(os.environ, LLM_USER_PATH=str(tmp_path))
        r = subprocess.run([*llm, "-m", "tiny", "-o", "max_tokens", "5", "Hello"], capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == 0 and r.stdout.strip(), r.stderr
        schema = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                   "adult": {"type": "boolean"}},
                  "required": ["age", "adult"], "additionalProperties": False}  # bounded: the model is random
        r = subprocess.run([*llm, "-m", "tiny", "--schema", json.dumps(schema), "How old?"], capture_output=True,
                           text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        answer = json.loads(r.stdout)
        assert isinstance(answer["age"], int) and isinstance(answer["adult"], bool)


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_greedy_constrained_decoding_masks_on_each_backend(tiny_hf, backend):
    """Greedy decoding with only a constraint takes the engine's device path (the mask added on the backend's
    arrays, argmax there); sampling takes the host path. Both hold the schema on a random model."""
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    model, tok = mlxllama.load(tiny_hf, backend=backend)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "boolean"}}, "required": ["n", "ok"]}
    engine = Engine(model, tok, max_batch=2)
    greedy = engine.submit(tok.encode("hello"), RequestParams(max_tokens=60, constraint=make_constraint(
        tok, model.args.vocab_size, json_schema=schema)))
    sampled = engine.submit(tok.encode("hello"), RequestParams(
        max_tokens=60, sampling=SamplingParams(temperature=1.0, seed=0),
        constraint=make_constraint(tok, model.args.vocab_size, json_schema=schema)))
    while engine.step():
        pass
    for h in (greedy, sampled):
        text, finish = _drain(h)
        assert finish == "stop" and set(json.loads(text)) == {"n", "ok"}


def test_constraint_protocol_accept_rollback_check_draft(tiny_hf):
    """What the engine's speculation uses: a draft is cut at its first disallowed token, and the matcher rolls back
    with the KV cache."""
    model, tok = mlxllama.load(tiny_hf, backend="numpy")
    c = make_constraint(tok, model.args.vocab_size, grammar='start: "ab" ("cd" | "ef")')
    spell = ll_tokenizer(tok).greedy_tokenize
    good, bad = spell("abcd"), spell("abx")
    assert c.check_draft(good) == len(good) and c.check_draft(bad) == len(spell("ab"))
    start = c.allowed().copy()
    c.accept(spell("ab"))
    after_ab = c.allowed().copy()
    assert not (start == after_ab).all() and not c.done
    c.accept(spell("cd"))
    assert c.done
    c.rollback(len(spell("cd")))
    assert not c.done and (c.allowed() == after_ab).all()
    c.rollback(len(spell("ab")))
    assert (c.allowed() == start).all() and c.allowed().shape == (model.args.vocab_size,)
