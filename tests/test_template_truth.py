"""Golden truth for the chat templates: every consumer turns the same conversation into the same token ids.

For each conversation and each format it applies to, four renderings must give identical ids:

(a) transformers' ``apply_chat_template`` with a real tokenizer (the tiny Llama 3 fixture's, the same files with
    the llama3.1 inference template, SmolLM2's for chatml);
(b) llama.cpp from a GGUF written by ``edgezh convert``: llama-cpp-python's ``Jinja2ChatFormatter`` on the
    GGUF's embedded ``tokenizer.chat_template`` with the GGUF's own BOS/EOS tokens (what llama-cpp-python
    does for a GGUF's chat template), tokenized by llama.cpp itself;
(c) the Modelfile's Go template executed by ``tests/gotemplate`` (a small re-implementation of Ollama's template
    data model), with the BOS that llama.cpp adds for ``add_bos_token`` formats prepended;
(d) ``edgezh.templates.render``.

The equality conversations avoid the cases where Ollama cannot match the jinja (see the registry docstring); the
tests at the end pin those documented differences so the docstring stays true.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from chat_samples import TIME_TOOL, WEATHER_TOOL
from edgezh import templates

ROOT = Path(__file__).resolve().parents[1]
GO_HARNESS_SRC = ROOT / "tests" / "gotemplate" / "main.go"
BOS = "<|begin_of_text|>"
NO_GO = "Go is not installed (apt-get install golang-go): the Ollama Go template (part c) is not executed"

SYSTEM = {"role": "system", "content": "你是一位耐心的中文老师。"}
DEFAULT_SYSTEM = templates.get("llama3").default_system  # what `edgezh modelfile` writes as SYSTEM by default


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def calls(*pairs: tuple[str, dict]) -> dict:
    """An assistant turn of OpenAI-style tool calls with object arguments (content None, as clients send)."""
    return {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}
                           for name, arguments in pairs]}


def tool(text: str, role: str = "tool") -> dict:
    return {"role": role, "content": text}


# Tools written the way Ollama prints them (keys in its struct field order, property names sorted), so that
# the equality suite is not about JSON key order (pinned separately below).
FORECAST_TOOL = {
    "type": "function",
    "function": {
        "name": "get_forecast",
        "description": "查询未来几天的天气预报",
        "parameters": {
            "type": "object",
            "required": ["city", "days"],
            "properties": {
                "city": {"type": "string", "description": "城市"},
                "days": {"type": "integer", "description": "天数", "enum": [1, 3, 7]},
                # Nested properties keep their order in Ollama (an ordered map), unlike the top level: unsorted here.
                "options": {"type": "object", "description": "选项",
                            "properties": {"units": {"type": "string"}, "lang": {"type": "string"}},
                            "required": ["lang"]},
                "tags": {"type": ["array", "null"], "items": {"type": "string"}, "description": "标签"},
            },
        },
    },
}

NOW_TOOL = {
    "type": "function",
    "function": {"name": "get_beijing_time", "description": "查询北京时间",
                 "parameters": {"type": "object", "properties": {}}},
}

# A call of a tool without parameters: "arguments" left out, or null. Both render as {} (the Go template and the
# jinja default them alike; Ollama's template data would otherwise print null).
CALL_WITHOUT_ARGUMENTS = {"role": "assistant", "content": None, "tool_calls": [
    {"type": "function", "function": {"name": "get_beijing_time"}},
    {"type": "function", "function": {"name": "get_beijing_time", "arguments": None}},
]}


@dataclass(frozen=True)
class Chat:
    """One golden conversation. ``modelfile_system`` is the Modelfile's SYSTEM: Ollama prepends it as a system
    message when the request does not start with one; the jinja paths get that effective conversation."""

    id: str
    messages: list[dict]
    tools: list[dict] | None = None
    modelfile_system: str | None = None

    def effective_messages(self) -> list[dict]:
        if self.modelfile_system and self.messages[0]["role"] != "system":
            return [{"role": "system", "content": self.modelfile_system}, *self.messages]
        return self.messages

    def wants_prompt(self) -> bool:
        """Generation prompt exactly when the last message is not the assistant's (as the Go templates do)."""
        return self.messages[-1]["role"] != "assistant"


# Conversations every format renders: no leading/trailing whitespace (llama3 trims, Go cannot), no consecutive
# messages of one role (Ollama merges them).
CHATS = [
    Chat("single-user", [user("你好！")]),
    Chat("system-user", [SYSTEM, user("“学而时习之”是什么意思？")]),
    Chat("multi-turn-system-final-assistant", [
        SYSTEM, user("请用一句话介绍长城。"), assistant("长城是中国古代修建的军事防御工程，全长两万多公里。"),
        user("它是什么时候开始修建的？"), assistant("最早可以追溯到春秋战国时期。"),
    ]),
    Chat("multi-turn-no-system", [
        user("北京有哪些著名的景点？"), assistant("故宫、天坛、颐和园和八达岭长城。"), user("哪个最适合带孩子去？"),
    ]),
    Chat("single-turn-final-assistant", [user("把“谢谢”翻译成英文。"), assistant("Thank you.")]),
    Chat("long", [SYSTEM] + [m for i in range(5) for m in (user(f"第{i + 1}个问题：{i}+{i}等于几？"),
                                                            assistant(f"{i}+{i}={2 * i}。"))] + [user("谢谢老师！")]),
    Chat("inner-newlines-and-markup", [
        user("第一行\n第二行\n\n第三段：<b>粗体</b> & “引号” 'quotes'"), assistant("好的：\n1. 一\n2. 二"),
        user("再来一次"),
    ]),
    Chat("template-syntax-in-text", [
        user("解释 {{ .Content }}、{{ x }} 和 {% if a %} 这类标记 🙂"),
        assistant("它们是模板语法：{{ 变量 }}、{% 语句 %}；\"引号\" 原样保留。"),
    ]),
    Chat("code-block", [
        user("用 Python 写一个函数，返回列表里的偶数。"),
        assistant("```python\ndef evens(xs):\n    return [x for x in xs if x % 2 == 0]\n```"),
        user("改成生成器"),
    ]),
    Chat("modelfile-system", [user("今天我们学什么？")], modelfile_system=DEFAULT_SYSTEM),
    Chat("modelfile-system-multi-turn", [
        user("“不亦乐乎”的“乐”怎么读？"), assistant("读 lè，意思是快乐。"), user("那“乐器”呢？"),
    ], modelfile_system=DEFAULT_SYSTEM),
    Chat("request-system-replaces-modelfile-system", [SYSTEM, user("你好")], modelfile_system=DEFAULT_SYSTEM),
]

# ChatML does not trim (neither does Go), so whitespace at the edges is part of its equality suite.
CHATML_CHATS = [
    Chat("whitespace-kept", [
        {"role": "system", "content": "\n  请简洁回答。  \n"}, user("  第一行\n第二行\n\n"),
        assistant("\n好的：\n1. 一\n2. 二  "), user("继续"),
    ]),
]

TOOL_CHATS = [
    Chat("tools-system-user", [SYSTEM, user("上海现在天气怎么样？")], [WEATHER_TOOL, TIME_TOOL]),
    Chat("tools-user-only", [user("现在几点了？")], [TIME_TOOL]),
    Chat("tools-call-result-answer", [
        user("上海现在天气怎么样？"), calls(("get_weather", {"city": "上海", "unit": "celsius"})),
        tool("多云，21℃"), assistant("上海现在多云，气温21摄氏度。"),
    ], [WEATHER_TOOL]),
    Chat("tools-two-calls-two-results", [
        SYSTEM, user("北京的天气和时间？"),
        calls(("get_weather", {"city": "北京"}), ("get_time", {"tz": "Asia/Shanghai"})),
        tool('{"condition":"晴","temperature":3}'), tool("08:00"),
    ], [WEATHER_TOOL, TIME_TOOL]),
    Chat("tools-json-result", [
        user("杭州未来三天天气？"), calls(("get_forecast", {"city": "杭州", "days": 3})),
        tool('{"city":"杭州","forecast":[{"day":"周一","high":25,"low":18},{"day":"周二","high":27,"low":19}]}'),
        assistant("周一18到25度，周二19到27度。"),
    ], [FORECAST_TOOL]),
    Chat("tools-nested-arguments", [
        user("用中文和公制单位查杭州七天的天气。"),
        calls(("get_forecast", {"city": "杭州", "days": 7, "options": {"lang": "zh", "units": "metric"},
                                "tags": ["旅行", "周末"]})),
    ], [FORECAST_TOOL, WEATHER_TOOL]),
    Chat("ipython-result", [
        user("现在几点了？"), calls(("get_time", {"tz": "Asia/Shanghai"})), tool("08:00", role="ipython"),
    ], [TIME_TOOL]),
    Chat("tool-history-without-tools", [
        user("几点了？"), calls(("get_time", {"tz": "Asia/Shanghai"})), tool("08:00"), assistant("现在是早上八点。"),
    ]),
    Chat("tools-modelfile-system", [user("明天北京会下雨吗？")], [WEATHER_TOOL], modelfile_system=DEFAULT_SYSTEM),
    Chat("tool-call-final-assistant", [user("查一下广州的天气"), calls(("get_weather", {"city": "广州"}))],
         [WEATHER_TOOL]),
    Chat("tools-multi-turn", [
        SYSTEM, user("上海天气？"), calls(("get_weather", {"city": "上海"})), tool('{"condition":"小雨"}'),
        assistant("上海在下小雨，记得带伞。"), user("那东京现在几点？"), calls(("get_time", {"tz": "Asia/Tokyo"})),
        tool("09:00"),
    ], [WEATHER_TOOL, TIME_TOOL]),
    Chat("tool-calls-without-arguments", [user("北京时间几点？"), CALL_WITHOUT_ARGUMENTS, tool("08:00"), tool("08:00")],
         [NOW_TOOL]),
]


def suite() -> list:
    params = [pytest.param(fmt, chat, id=f"{fmt}-{chat.id}") for fmt in templates.names() for chat in CHATS]
    params += [pytest.param("chatml", chat, id=f"chatml-{chat.id}") for chat in CHATML_CHATS]
    params += [pytest.param("llama3.1", chat, id=f"llama3.1-{chat.id}") for chat in TOOL_CHATS]
    return params


# --- the four renderers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizers(tiny_llama3: Path, smollm2: Path) -> dict[str, PreTrainedTokenizerBase]:
    """Each format's real tokenizer, carrying the format's jinja as its chat template."""
    llama31 = AutoTokenizer.from_pretrained(tiny_llama3, chat_template=templates.get("llama3.1").inference)
    result = {"llama3": AutoTokenizer.from_pretrained(tiny_llama3), "llama3.1": llama31,
              "chatml": AutoTokenizer.from_pretrained(smollm2)}
    for fmt, tok in result.items():  # the fixtures really carry the registry's template
        assert tok.chat_template in (templates.get(fmt).training, templates.get(fmt).inference)
    return result


@pytest.fixture(scope="session")
def go_harness(tmp_path_factory) -> Path | None:
    """tests/gotemplate built once per session; None when Go is absent."""
    go = shutil.which("go")
    if go is None:
        return None
    binary = tmp_path_factory.mktemp("gotemplate") / "gotemplate"
    env = {**os.environ, "GOTOOLCHAIN": "local"}
    env.setdefault("GOCACHE", str(ROOT / ".cache" / "go-build"))
    build = subprocess.run([go, "build", "-o", str(binary), str(GO_HARNESS_SRC)], capture_output=True, text=True,
                           env=env, timeout=300)
    assert build.returncode == 0, f"go build {GO_HARNESS_SRC} failed:\n{build.stderr}"
    return binary


def ollama_render(harness: Path | None, fmt: str, messages: list[dict], tools: list[dict] | None = None,
                  system: str | None = None) -> str:
    """The prompt text Ollama renders from the Modelfile TEMPLATE (BOS not included: llama.cpp adds it)."""
    if harness is None:
        pytest.skip(NO_GO)
    request = {"template": templates.get(fmt).ollama, "system": system, "messages": messages, "tools": tools}
    run = subprocess.run([str(harness)], input=json.dumps(request, ensure_ascii=False), capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return run.stdout


def ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The registry's BOS rule: rendered text is tokenized without adding special tokens."""
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="session")
def gguf_engines(tiny_llama3: Path, smollm2: Path, tmp_path_factory) -> dict:
    """Per format, llama.cpp (vocab only) over a GGUF that edgezh's converter wrote with that format."""
    from llama_cpp import Llama

    from edgezh.export.gguf_writer import convert

    folder = tmp_path_factory.mktemp("truth-gguf")
    engines = {}
    for fmt, model in (("llama3", tiny_llama3), ("llama3.1", tiny_llama3), ("chatml", smollm2)):
        path = folder / f"{fmt}.gguf"
        convert(model, path, "f16", template=fmt)
        engines[fmt] = Llama(str(path), vocab_only=True, verbose=False)
    yield engines
    for engine in engines.values():
        engine.close()


def llama_cpp_ids(engine, chat: Chat) -> list[int]:
    """llama-cpp-python's chat formatting from the GGUF's own template and special tokens, tokenized by llama.cpp."""
    meta = engine.metadata
    token = lambda key: engine._model.token_get_text(int(meta[key]))  # noqa: E731
    formatter = Jinja2ChatFormatter(template=meta["tokenizer.chat_template"], eos_token=token("tokenizer.ggml.eos_token_id"),
                                    bos_token=token("tokenizer.ggml.bos_token_id"), add_generation_prompt=chat.wants_prompt())
    response = formatter(messages=chat.effective_messages(), tools=chat.tools)
    assert response.added_special  # llama-cpp-python then tokenizes without adding a BOS of its own
    return engine.tokenize(response.prompt.encode("utf-8"), add_bos=False, special=True)


def assert_bos_rule(fmt: str, tok: PreTrainedTokenizerBase, token_ids: list[int]) -> None:
    if templates.get(fmt).bos_token:
        bos_id = tok.convert_tokens_to_ids(BOS)
        assert token_ids[0] == bos_id and token_ids.count(bos_id) == 1
    else:  # ChatML: the first token is the first turn's <|im_start|>, nothing before it
        assert token_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
        assert tok.convert_tokens_to_ids(BOS) not in token_ids


# --- the equality suite ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "chat"), suite())
def test_hf_llama_cpp_and_registry_give_the_same_token_ids(fmt, chat, tokenizers, gguf_engines):
    tok = tokenizers[fmt]
    messages, prompt = chat.effective_messages(), chat.wants_prompt()
    hf_ids = tok.apply_chat_template(messages, tools=chat.tools, add_generation_prompt=prompt, tokenize=True,
                                     return_dict=False)
    registry_text = templates.render(fmt, messages, tools=chat.tools, add_generation_prompt=prompt)
    assert llama_cpp_ids(gguf_engines[fmt], chat) == hf_ids
    assert ids(tok, registry_text) == hf_ids
    assert_bos_rule(fmt, tok, hf_ids)
    end = "<|eom_id|>" if messages[-1].get("tool_calls") else templates.get(fmt).eos_token
    # A final assistant turn keeps its end token (ChatML: and the newline after it); there is no prefill.
    assert registry_text.removesuffix("\n" if fmt == "chatml" else "").endswith(end) != prompt
    for message in messages:  # no message is lost on the way
        if isinstance(message.get("content"), str):
            assert message["content"].strip() in tok.decode(hf_ids)


@pytest.mark.parametrize(("fmt", "chat"), suite())
def test_ollama_go_template_gives_the_same_token_ids(fmt, chat, tokenizers, go_harness):
    tok = tokenizers[fmt]
    messages, prompt = chat.effective_messages(), chat.wants_prompt()
    text = ollama_render(go_harness, fmt, chat.messages, chat.tools, system=chat.modelfile_system)
    bos_ids = [tok.convert_tokens_to_ids(templates.get(fmt).bos_token)] if templates.get(fmt).bos_token else []
    ollama_ids = bos_ids + ids(tok, text)  # llama.cpp prepends the BOS for add_bos_token formats
    hf_ids = tok.apply_chat_template(messages, tools=chat.tools, add_generation_prompt=prompt, tokenize=True,
                                     return_dict=False)
    assert ollama_ids == hf_ids
    assert BOS not in text
    assert_bos_rule(fmt, tok, ollama_ids)


def test_suite_is_big_enough():
    conversations = CHATS + CHATML_CHATS + TOOL_CHATS
    assert len({chat.id for chat in conversations}) == len(conversations) >= 20
    assert len(suite()) >= 3 * len(CHATS) + len(TOOL_CHATS)


def test_chatml_gguf_asks_for_no_bos(smollm2_gguf: Path):
    """Part (c) prepends no BOS for ChatML: llama.cpp/Ollama add one only where the GGUF says add_bos_token,
    and SmolLM2's does not (its BOS id is <|im_start|>, which would double the first turn's header)."""
    import gguf

    field = gguf.GGUFReader(smollm2_gguf).fields["tokenizer.ggml.add_bos_token"]
    assert field.contents() is False
    assert templates.get("chatml").bos_token is None


# --- pinned differences (the registry docstring's "known limits of Go templates/Ollama") ------------------------


def jinja_text(fmt: str, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The registry text minus its BOS, with the generation prompt as the Go templates decide it."""
    text = templates.render(fmt, messages, tools=tools, add_generation_prompt=messages[-1]["role"] != "assistant")
    return text.removeprefix(BOS)


@pytest.mark.parametrize("fmt", ["llama3", "llama3.1"])
def test_go_cannot_trim_content(fmt, go_harness):
    raw = [{"role": "system", "content": "\n  请简洁回答。  \n"}, user("  第一行\n第二行\n\n"),
           assistant("\n好的。  "), user("继续")]
    stripped = [{**m, "content": m["content"].strip()} for m in raw]
    go_raw = ollama_render(go_harness, fmt, raw)
    assert jinja_text(fmt, raw) == jinja_text(fmt, stripped)  # the jinja trims ...
    assert "<|end_header_id|>\n\n请简洁回答。<|eot_id|>" in jinja_text(fmt, raw)
    assert "<|end_header_id|>\n\n\n  请简洁回答。  \n<|eot_id|>" in go_raw  # ... Ollama prints as is
    assert "<|end_header_id|>\n\n\n好的。  <|eot_id|>" in go_raw
    assert ollama_render(go_harness, fmt, stripped) == jinja_text(fmt, raw)  # and that is the only difference


def test_go_json_sorts_argument_keys_and_escapes_html(go_harness):
    messages = [user("搜一下"), calls(("search", {"query": "a<b && c>d", "lang": "zh"}))]
    go_text = ollama_render(go_harness, "llama3.1", messages)
    assert '{"name": "search", "parameters": {"query":"a<b && c>d","lang":"zh"}}<|eom_id|>' in jinja_text(
        "llama3.1", messages)
    assert '{"name": "search", "parameters": {"lang":"zh","query":"a\\u003cb \\u0026\\u0026 c\\u003ed"}}<|eom_id|>' \
        in go_text


def test_go_prints_tools_in_struct_field_order(go_harness):
    # Keys in an unusual order: "function" first, properties unsorted, "properties" before "required".
    tool_def = {"function": {"parameters": {"properties": {"zone": {"description": "地区", "type": "string"},
                                                           "city": {"type": "string"}},
                                            "required": ["city"], "type": "object"},
                             "description": "查询", "name": "lookup"},
                "type": "function"}
    messages = [user("查一下")]
    caller_order = json.dumps(tool_def, ensure_ascii=False, separators=(",", ":"))
    struct_order = ('{"type":"function","function":{"name":"lookup","description":"查询","parameters":'
                    '{"type":"object","required":["city"],"properties":{"city":{"type":"string"},'
                    '"zone":{"type":"string","description":"地区"}}}}}')
    assert f"\n\n{caller_order}" in jinja_text("llama3.1", messages, [tool_def])
    go_text = ollama_render(go_harness, "llama3.1", messages, [tool_def])
    assert f"\n\n{struct_order}<|eot_id|>" in go_text
    # With the tool written in that order, the two agree again.
    assert go_text == jinja_text("llama3.1", messages, [json.loads(struct_order)])


def test_go_tool_json_always_has_description_and_drops_unknown_schema_keys(go_harness):
    """Beyond key order: Ollama's template tool struct always prints "description" (not omitempty), and its
    ToolProperty keeps only anyOf/type/items/description/enum/properties/required."""
    tool_def = {"type": "function", "function": {"name": "roll", "parameters": {
        "type": "object", "required": ["sides"], "properties": {"sides": {"type": "integer", "minimum": 2}}}}}
    go_text = ollama_render(go_harness, "llama3.1", [user("掷骰子")], [tool_def])
    assert ('{"type":"function","function":{"name":"roll","description":"","parameters":{"type":"object",'
            '"required":["sides"],"properties":{"sides":{"type":"integer"}}}}}<|eot_id|>') in go_text
    assert '"minimum":2' in jinja_text("llama3.1", [user("掷骰子")], [tool_def])


@pytest.mark.parametrize("fmt", templates.names())
def test_ollama_merges_consecutive_messages_of_one_role(fmt, go_harness):
    messages = [user("第一句。"), user("第二句。")]
    merged = [user("第一句。\n\n第二句。")]
    assert ollama_render(go_harness, fmt, messages) == jinja_text(fmt, merged)
    assert jinja_text(fmt, messages) != jinja_text(fmt, merged)  # the jinja keeps two user turns


def test_ollama_merges_consecutive_ipython_results_but_not_tool_results(go_harness):
    head = [user("两个城市的时间？"), calls(("get_time", {"tz": "Asia/Shanghai"}), ("get_time", {"tz": "Asia/Tokyo"}))]
    for role, turns in (("tool", 2), ("ipython", 1)):
        messages = [*head, tool("08:00", role), tool("09:00", role)]
        go_text = ollama_render(go_harness, "llama3.1", messages)
        assert go_text.count("<|start_header_id|>ipython<|end_header_id|>") == turns
        assert jinja_text("llama3.1", messages).count("<|start_header_id|>ipython<|end_header_id|>") == 2
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n08:00\n\n09:00<|eot_id|>" in go_text


def test_string_arguments_are_jinja_only(go_harness):
    """The jinja inserts tool-call arguments given as a JSON string verbatim; Ollama's API takes only an object."""
    messages = [user("几点了？"), {"role": "assistant", "tool_calls": [
        {"function": {"name": "get_time", "arguments": '{"tz": "Asia/Shanghai"}'}}]}]
    assert '{"name": "get_time", "parameters": {"tz": "Asia/Shanghai"}}<|eom_id|>' in jinja_text("llama3.1", messages)
    if go_harness is None:
        pytest.skip(NO_GO)
    request = {"template": templates.get("llama3.1").ollama, "system": None, "messages": messages, "tools": None}
    run = subprocess.run([str(go_harness)], input=json.dumps(request), capture_output=True, text=True, timeout=30)
    assert run.returncode != 0 and "expected a JSON object" in run.stderr


def test_ollama_collation_drops_tool_calls_of_a_following_assistant_message(go_harness):
    """The jinja wants text and tool calls in separate assistant turns; Ollama merges consecutive assistant
    messages by content only, so the calls of the second one never reach the prompt."""
    messages = [user("上海天气？"), assistant("我查一下。"), calls(("get_weather", {"city": "上海"}))]
    assert '{"name": "get_weather", "parameters": {"city":"上海"}}<|eom_id|>' in jinja_text("llama3.1", messages)
    go_text = ollama_render(go_harness, "llama3.1", messages)
    assert go_text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n我查一下。\n\n<|eot_id|>")
    assert "get_weather" not in go_text
