"""`edgezh serve` with the official openai client: chat (streaming or not), completions, models, tools;
bad requests get 4xx JSON; 20 concurrent requests finish or get 429 and none hang; the server serves on;
4 parallel streaming clients get the answers they get alone; structured output (response_format) that
validates against its schema; logprobs, n > 1 and seed. Every server binds 127.0.0.1 on a free port and
is stopped by its fixture or test."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import ROOT, run_cli
from test_runtime_fixtures import (ThreadServer, engine_for, free_port, grammar_for, smollm2_f16_gguf,  # noqa: F401
                                   smollm2_q4_gguf, tiny31_gguf, tiny_gguf)

KEY = "test-key-123"
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate arithmetic",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


@pytest.fixture(scope="module")
def smol_server(smollm2_f16_gguf: Path):
    """`edgezh serve` (the CLI, in its own process) on SmolLM2, with an API key."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "edgezh.cli", "serve", str(smollm2_f16_gguf), "--port", str(port), "--api-key", KEY,
         "--model-name", "smol", "--ctx", "1024", "--threads", "2", "--queue", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited: {process.stdout.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not come up in 90 s")
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture()
def client(smol_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smol_server}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "What is the capital of France? One word."}],
        max_tokens=16, temperature=0)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content and choice.finish_reason == "stop"
    assert reply.model == "smol" and reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streaming_is_the_same_answer_and_utf8_clean(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "请用中文介绍一下北京。"}]
    whole = client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and "\ufffd" not in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_tools_call_and_result(client: openai.OpenAI) -> None:
    """A grammar (llama.cpp's, an extension field) makes SmolLM2 write a ReAct call; the server returns it as
    OpenAI tool_calls, streaming and not; the tool result sent back gets an answer."""
    step = 'Thought: 需要计算\nAction: calculator\nAction Input: {"expression": "6*7"}\nObservation:'
    messages = [{"role": "user", "content": "6 乘以 7 是多少？"}]
    reply = client.chat.completions.create(model="smol", messages=messages, tools=[CALCULATOR], max_tokens=64,
                                           temperature=0, extra_body={"grammar": grammar_for(step)})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "calculator" and json.loads(call.function.arguments) == {"expression": "6*7"}
    chunks = list(client.chat.completions.create(model="smol", messages=messages, tools=[CALCULATOR], max_tokens=64,
                                                 temperature=0, stream=True, extra_body={"grammar": grammar_for(step)}))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "calculator" and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)  # the raw ReAct text is not shown
    follow = messages + [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "42"}]
    final = client.chat.completions.create(model="smol", messages=follow, tools=[CALCULATOR], max_tokens=64,
                                           temperature=0,
                                           extra_body={"grammar": grammar_for("Final Answer: 6 乘以 7 等于 42。")})
    assert final.choices[0].message.content == "6 乘以 7 等于 42。" and final.choices[0].finish_reason == "stop"


def test_completions_and_models(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=4,
                                           temperature=0)
    assert "Paris" in completion.choices[0].text and completion.choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list().data] == ["smol"]


@pytest.mark.parametrize("body, status, param", [
    ({"model": "smol", "messages": "hello"}, 400, "messages"),
    ({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "smol", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "smol", "messages": []}, 400, "messages"),
    ({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "n"),
    ({"model": "smol", "messages": [{"role": "user", "content": "长" * 5000}]}, 400, "messages"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "grammar": "root ::= nothing"}, 400, "grammar"),
])
def test_bad_requests_get_4xx_json(smol_server: str, body: dict, status: int, param: str) -> None:
    response = httpx.post(f"{smol_server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["param"] == param


def test_bad_json_auth_and_routes(smol_server: str, client: openai.OpenAI) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    broken = httpx.post(f"{smol_server}/v1/chat/completions", content=b"{not json", headers=headers, timeout=30)
    assert broken.status_code == 400 and "error" in broken.json()
    assert httpx.get(f"{smol_server}/v1/nothing", headers=headers).json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{smol_server}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{smol_server}/v1/models").status_code == 401
    assert httpx.get(f"{smol_server}/health").json()["status"] == "ok"  # health needs no key
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}], temperature=7)


def test_llama31_tool_calls_through_the_server(tiny31_gguf: Path) -> None:
    call = '{"name": "calculator", "parameters": {"expression": "1+1"}}'
    with ThreadServer(engine_for(tiny31_gguf), model_id="tiny") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "1+1?"}],
                                               tools=[CALCULATOR], max_tokens=64, temperature=0,
                                               extra_body={"grammar": grammar_for(call)})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"expression": "1+1"}


def test_twenty_concurrent_requests_finish_or_get_429(tiny_gguf: Path) -> None:
    with ThreadServer(engine_for(tiny_gguf), model_id="tiny", queue_size=3) as server:
        outcomes: list[object] = [None] * 20

        def ask(index: int) -> None:
            body = {"model": "tiny", "messages": [{"role": "user", "content": f"第{index}个问题"}], "max_tokens": 12,
                    "stream": index % 2 == 0}
            try:
                with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
                    text = response.read().decode()
                    if response.status_code == 200 and body["stream"]:
                        assert text.rstrip().endswith("data: [DONE]")
                    elif response.status_code == 200:
                        assert json.loads(text)["choices"][0]["finish_reason"] in ("stop", "length")
                    else:
                        assert json.loads(text)["error"]["code"] == "queue_full"
                    outcomes[index] = response.status_code
            except BaseException as exc:  # noqa: BLE001 - reported below
                outcomes[index] = exc

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
        assert not any(thread.is_alive() for thread in threads), "a request hung"
        assert all(outcome in (200, 429) for outcome in outcomes), outcomes
        assert outcomes.count(200) >= 4 and outcomes.count(429) >= 1
        assert httpx.get(f"{server.url}/health").json()["queue"]["in_flight"] == 0
        after = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "你好", "max_tokens": 4},
                           timeout=60)
        assert after.status_code == 200 and after.json()["choices"][0]["text"] is not None


def test_a_client_leaving_a_stream_stops_its_generation(tiny_gguf: Path) -> None:
    """6000 tokens would take the tiny model half a minute; a client that leaves after a few chunks frees
    the server within seconds."""
    with ThreadServer(engine_for(tiny_gguf, n_ctx=8192), model_id="tiny", queue_size=1) as server:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "写一篇长文章"}], "max_tokens": 6000,
                "stream": True, "temperature": 1.0}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]
        left = time.monotonic()
        assert any(line.startswith("data: ") for line in received)
        while httpx.get(f"{server.url}/health").json()["queue"]["in_flight"]:
            assert time.monotonic() - left < 8, "the abandoned generation kept running"
            time.sleep(0.05)


def test_serve_cli_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"not a model")
    for args, message in [([str(tmp_path / "x.gguf")], "no such file or build folder"),
                          ([str(tmp_path), "--port", "0"], "not an edgezh build"),
                          (["--temperature", "9", str(tmp_path / "junk.gguf")], "temperature must be between 0 and 5"),
                          ([str(tmp_path / "junk.gguf")], "not a GGUF file"),
                          (["--parallel", "0", str(tmp_path / "junk.gguf")], "--parallel must be ≥ 1")]:
        result = run_cli("serve", *args, cwd=ROOT, timeout=60)
        output = (result.stdout + result.stderr).strip()
        assert result.returncode == 2 and message in output and "Traceback" not in output
        assert output.count("\n") == 0


# --- parallel serving, structured output, logprobs, n ---------------------------------------------------

@pytest.fixture(scope="module")
def parallel_server(smollm2_q4_gguf: Path):
    """SmolLM2 q4_k_m, 4 sequences decoding together."""
    with ThreadServer(engine_for(smollm2_q4_gguf, parallel=4, n_ctx=1024), model_id="smol") as server:
        yield server


def smol_client(server: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)


def streamed(client: openai.OpenAI, question: str, **options) -> str:
    chunks = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": question}],
                                            stream=True, **options)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_four_parallel_streaming_clients_get_the_answers_they_get_alone(parallel_server: ThreadServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = smol_client(parallel_server)
    questions = ["请介绍一下长城。", "Describe the water cycle.", "什么是人工智能？", "Name three planets."]
    options = dict(max_tokens=64, temperature=0, seed=7)
    alone = [streamed(client, q, **options) for q in questions]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda q: streamed(smol_client(parallel_server), q, **options), questions))
    assert together == alone and all(alone)  # no 429 (openai would raise), the same text token for token
    assert httpx.get(f"{parallel_server.url}/health").json()["queue"]["in_flight"] == 0


SCHEMAS = [
    {"type": "object", "additionalProperties": False, "required": ["city", "population_millions", "is_capital"],
     "properties": {"city": {"type": "string", "maxLength": 20}, "population_millions": {"type": "number"},
                    "is_capital": {"type": "boolean"}}},
    {"type": "object", "required": ["name", "tags", "rating"],
     "properties": {"name": {"type": "string", "maxLength": 24}, "rating": {"type": "integer"},
                    "tags": {"type": "array", "minItems": 1, "maxItems": 3,
                             "items": {"type": "string", "enum": ["food", "travel", "history", "science"]}}}},
    {"type": "object", "required": ["answer", "confidence", "date"],
     "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                    "confidence": {"type": "string", "pattern": "^(low|medium|high)$"},
                    "date": {"type": "string", "format": "date"}}},
    {"$defs": {"person": {"type": "object", "required": ["name", "age"],
                          "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}}}},
     "type": "object", "required": ["people"],
     "properties": {"people": {"type": "array", "items": {"$ref": "#/$defs/person"}, "minItems": 1, "maxItems": 2}}},
]
PROMPTS = ["用 JSON 描述一个中国城市。", "Describe a restaurant as JSON.", "明天会下雨吗？用 JSON 回答。",
           "List two people with their ages as JSON."]


def test_100_structured_responses_validate_streamed_and_not(parallel_server: ThreadServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import jsonschema

    def one(index: int) -> tuple[str, str, dict]:
        schema = SCHEMAS[index % 4]
        body = dict(model="smol", messages=[{"role": "user", "content": PROMPTS[index % 4]}], max_tokens=120,
                    temperature=0.8, seed=index,
                    response_format={"type": "json_schema", "json_schema": {"name": f"s{index % 4}", "schema": schema}})
        client = smol_client(parallel_server)
        if index % 2:
            chunks = list(client.chat.completions.create(stream=True, **body))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            reply = client.chat.completions.create(**body)
            text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        return text, finish, schema

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(100)))
    valid = 0
    for text, finish, schema in results:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)
        valid += 1
    assert valid == 100 and len({text for text, _, _ in results}) > 20  # sampled: varied answers, all valid


def test_schema_strings_refuse_raw_control_characters(smollm2_f16_gguf: Path) -> None:
    """JSON strings cannot hold a raw newline or tab (RFC 8259); llama-cpp-python's schema grammar let them
    in, and json.loads then refused the answer. After a string has started, llama.cpp's grammar sampler must
    refuse the newline and tab tokens and take a letter or an escape."""
    import ctypes
    import math

    import llama_cpp

    from edgezh.runtime.structured import grammar_for as schema_grammar

    engine = engine_for(smollm2_f16_gguf)
    grammar = schema_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[3]}})
    sampler = llama_cpp.llama_sampler_init_grammar(engine.vocab, grammar.encode(), b"root")
    try:
        for token in engine.tokenize('{ "people": [ { "name" : "Li'):
            llama_cpp.llama_sampler_accept(sampler, token)

        def allowed(text: str) -> bool:
            (token,) = engine.tokenize(text)
            data = (llama_cpp.llama_token_data * 1)()
            data[0].id, data[0].logit = token, 1.0
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(llama_cpp.llama_token_data_array(data, 1, -1, False)))
            return math.isfinite(data[0].logit)

        assert allowed("n") and allowed("\\") and allowed('"')
        assert not allowed("\n") and not allowed("\t")
    finally:
        llama_cpp.llama_sampler_free(sampler)


def test_json_object_and_unsupported_schema_keywords(parallel_server: ThreadServer) -> None:
    client = smol_client(parallel_server)
    reply = client.chat.completions.create(model="smol", max_tokens=120, temperature=0,
                                           messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop" and isinstance(json.loads(reply.choices[0].message.content), dict)
    bad = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}, "required": ["age"]}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
    error = caught.value.body
    assert "'minimum'" in error["message"] and error["param"] == "response_format.json_schema.schema.properties.age.minimum"
    for schema, keyword in [({"type": "array", "uniqueItems": True, "items": {"type": "string"}}, "uniqueItems"),
                            ({"type": "object", "patternProperties": {"^a": {"type": "string"}}}, "patternProperties"),
                            ({"not": {"type": "string"}}, "not")]:
        response = httpx.post(f"{parallel_server.url}/v1/chat/completions", timeout=30, json={
            "model": "smol", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
        assert response.status_code == 400 and f"'{keyword}'" in response.json()["error"]["message"]


def test_logprobs_n_and_seed(parallel_server: ThreadServer) -> None:
    client = smol_client(parallel_server)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(item.token for item in content) == reply.choices[0].message.content
    assert all(item.logprob <= 0 and len(item.top_logprobs) == 2 and item.top_logprobs[0].token == item.token
               for item in content)
    chunks = list(client.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0,
                                                 logprobs=True, stream=True))
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs) == len(content)
    sampled = dict(model="smol", messages=[{"role": "user", "content": "讲一个笑话。"}], max_tokens=24, temperature=1.0)
    three = client.chat.completions.create(n=3, seed=11, **sampled)
    one = client.chat.completions.create(n=1, seed=11, **sampled)
    texts = [choice.message.content for choice in sorted(three.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and texts[0] == one.choices[0].message.content and len(set(texts)) > 1
    assert three.usage.completion_tokens > one.usage.completion_tokens
    streamed_three = list(client.chat.completions.create(n=3, seed=11, stream=True, **sampled))
    by_choice = ["".join(c.choices[0].delta.content or "" for c in streamed_three if c.choices and c.choices[0].index == i)
                 for i in range(3)]
    assert by_choice == texts
