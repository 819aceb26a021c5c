"""The chat-template registry: jinja variants agree with each other and with transformers, generation
markers cover exactly what the model says, one BOS, detection, and the shipped Ollama templates."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import render_jinja_template

from chat_samples import TIME_TOOL, WEATHER_TOOL
from edgezh import templates

ROOT = Path(__file__).resolve().parents[1]
BOS = "<|begin_of_text|>"
END_TOKEN = {"llama3": "<|eot_id|>", "llama3.1": "<|eot_id|>", "chatml": "<|im_end|>"}
HEADERS = ("<|start_header_id|>", "<|end_header_id|>", "<|im_start|>")
SPECIAL_TOKENS = [BOS, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                  "<|im_start|>", "<|im_end|>", "<|endoftext|>"]

# Meta-Llama-3-8B-Instruct's own chat template (tokenizer_config.json), the reference for "llama3".
META_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# SmolLM2-135M-Instruct's chat template (as in its GGUF): ChatML plus a default English system prompt.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3.1-8B-Instruct's template, abridged to the parts detect() may look at.
META_LLAMA31_SNIPPET = (
    "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
    "{%- if tools is not none %}\n    {{- \"Environment: ipython\\n\" }}\n{%- endif %}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- if builtin_tools is defined %}\n    {{- \"<|eom_id|>\" }}\n{%- else %}\n    {{- \"<|eot_id|>\" }}\n{%- endif %}"
)



def call(name: str, arguments: dict | str) -> dict:
    """An OpenAI-style tool call."""
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


SYSTEM = {"role": "system", "content": "你是一位耐心的中文老师。"}

# (id, messages, tools) that every format renders.
CHATS: list[tuple[str, list[dict], list[dict] | None]] = [
    ("single-user", [{"role": "user", "content": "你好！"}], None),
    ("system-user", [SYSTEM, {"role": "user", "content": "“学而时习之”是什么意思？"}], None),
    ("multi-turn-system", [
        SYSTEM,
        {"role": "user", "content": "请用一句话介绍长城。"},
        {"role": "assistant", "content": "长城是中国古代修建的军事防御工程，全长两万多公里。"},
        {"role": "user", "content": "它是什么时候开始修建的？"},
        {"role": "assistant", "content": "最早可以追溯到春秋战国时期。"},
    ], None),
    ("multi-turn-no-system", [
        {"role": "user", "content": "北京有哪些著名的景点？"},
        {"role": "assistant", "content": "故宫、天坛、颐和园和八达岭长城。"},
        {"role": "user", "content": "哪个最适合带孩子去？"},
    ], None),
    ("ends-with-assistant", [
        {"role": "user", "content": "把“谢谢”翻译成英文。"},
        {"role": "assistant", "content": "Thank you."},
    ], None),
    ("whitespace", [
        {"role": "system", "content": "\n  请简洁回答。  \n"},
        {"role": "user", "content": "  第一行\n第二行\n\n"},
        {"role": "assistant", "content": "\n好的：\n1. 一\n2. 二  "},
        {"role": "user", "content": "继续"},
    ], None),
    ("template-like-text", [
        {"role": "user", "content": "解释 {{ x }}、{% if a %} 和 <|eot_id|> 这类标记 🙂"},
        {"role": "assistant", "content": "它们是 Jinja 语法：{{ 变量 }}、{% 语句 %}；\"引号\" 和 'quotes' 原样保留。"},
    ], None),
    ("long", [SYSTEM] + [
        message
        for i in range(4)
        for message in ({"role": "user", "content": f"第{i + 1}个问题：{i}+{i}等于几？"},
                        {"role": "assistant", "content": f"{i}+{i}={2 * i}。"})
    ] + [{"role": "user", "content": "谢谢老师！"}], None),
]

# (id, messages, tools) with tools: llama3.1 only.
TOOL_CHATS: list[tuple[str, list[dict], list[dict] | None]] = [
    ("tools-system-user", [SYSTEM, {"role": "user", "content": "上海现在天气怎么样？"}], [WEATHER_TOOL, TIME_TOOL]),
    ("tools-call-result-answer", [
        {"role": "user", "content": "上海现在天气怎么样？"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "上海", "unit": "celsius"})]},
        {"role": "tool", "content": "{\"temperature\": 21, \"condition\": \"多云\"}"},
        {"role": "assistant", "content": "上海现在多云，气温21摄氏度。"},
    ], [WEATHER_TOOL]),
    ("tools-two-calls", [
        SYSTEM,
        {"role": "user", "content": "北京的天气和时间？"},
        {"role": "assistant", "content": "", "tool_calls": [
            call("get_weather", {"city": "北京"}),
            call("get_time", '{"tz":"Asia/Shanghai"}'),
        ]},
        {"role": "tool", "content": {"temperature": 3, "condition": "晴"}},
        {"role": "ipython", "content": ["2025-01-01", "08:00"]},
    ], [WEATHER_TOOL, TIME_TOOL]),
    ("tool-history-without-tools", [
        {"role": "user", "content": "几点了？"},
        {"role": "assistant", "tool_calls": [call("get_time", {"tz": "Asia/Shanghai"})]},
        {"role": "tool", "content": "08:00"},
    ], None),
]


def cases() -> list:
    """Every (format, chat) pair the formats must render."""
    params = [pytest.param(fmt, msgs, tools, id=f"{fmt}-{cid}") for fmt in templates.names() for cid, msgs, tools in CHATS]
    params += [pytest.param("llama3.1", msgs, tools, id=f"llama3.1-{cid}") for cid, msgs, tools in TOOL_CHATS]
    return params


def wants_prompt(messages: list[dict]) -> bool:
    """Generation prompt exactly when the last message is not the assistant's (as the Ollama templates do)."""
    return messages[-1]["role"] != "assistant"


def hf_render(template: str, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
              **kwargs) -> tuple[str, list[tuple[int, int]]]:
    """transformers' rendering of one chat and its generation (assistant) character spans."""
    (text,), (spans,) = render_jinja_template([messages], tools=tools, chat_template=template,
                                              add_generation_prompt=add_generation_prompt,
                                              return_assistant_tokens_mask=True, **kwargs)
    return text, spans


def expected_assistant_text(fmt: str, message: dict) -> str:
    """What the model must learn to say for one assistant message: its content (or calls) and end token."""
    if message.get("tool_calls"):
        lines = []
        for tool_call in message["tool_calls"]:
            arguments = tool_call["function"]["arguments"]
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
            lines.append(f'{{"name": "{tool_call["function"]["name"]}", "parameters": {arguments}}}')
        return "\n".join(lines) + "<|eom_id|>"
    content = message["content"] if fmt == "chatml" else message["content"].strip()
    return content + END_TOKEN[fmt]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with every format's special tokens whose post-processor adds a BOS,
    like Llama 3's: tokenizing template text with special tokens added would double the BOS."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token="<|eot_id|>")


# --- the two jinja variants, the registry renderer and transformers agree ---------------------------------


@pytest.mark.parametrize(("fmt", "messages", "tools"), cases())
def test_training_and_inference_render_the_same(fmt, messages, tools):
    chat_format = templates.get(fmt)
    for prompt in (False, True):
        training, _ = hf_render(chat_format.training, messages, tools, prompt)
        inference, _ = hf_render(chat_format.inference, messages, tools, prompt)
        assert training == inference
        assert training.endswith("assistant<|end_header_id|>\n\n" if fmt != "chatml" else "<|im_start|>assistant\n") \
            == prompt


@pytest.mark.parametrize(("fmt", "messages", "tools"), cases())
def test_registry_render_equals_transformers_apply_chat_template(fmt, messages, tools, tokenizer):
    chat_format = templates.get(fmt)
    prompt = wants_prompt(messages)
    expected = tokenizer.apply_chat_template(messages, tools=tools, chat_template=chat_format.inference,
                                             add_generation_prompt=prompt, tokenize=False)
    assert templates.render(fmt, messages, tools=tools, add_generation_prompt=prompt) == expected
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) and content.strip():
            assert content.strip() in expected  # no message is dropped


@pytest.mark.parametrize(("messages", "tools"), [pytest.param(m, t, id=c) for c, m, t in CHATS])
def test_llama3_is_metas_llama3_instruct_format(messages, tools):
    for prompt in (False, True):
        meta = render_jinja_template([messages], chat_template=META_LLAMA3_TEMPLATE, add_generation_prompt=prompt,
                                     bos_token=BOS)[0][0]
        assert templates.render("llama3", messages, add_generation_prompt=prompt) == meta
        # Without tools, llama3.1 keeps the Llama 3 framing.
        assert templates.render("llama3.1", messages, add_generation_prompt=prompt) == meta


@pytest.mark.parametrize(("messages", "tools"), [pytest.param(m, t, id=c) for c, m, t in CHATS
                                                 if m[0]["role"] == "system"])
def test_chatml_is_smollm2s_format(messages, tools):
    for prompt in (False, True):
        smollm2 = render_jinja_template([messages], chat_template=SMOLLM2_TEMPLATE, add_generation_prompt=prompt)[0][0]
        assert templates.render("chatml", messages, add_generation_prompt=prompt) == smollm2


def test_llama31_tools_layout_golden():
    messages = TOOL_CHATS[2][1]
    text = templates.render("llama3.1", messages, tools=[WEATHER_TOOL, TIME_TOOL], add_generation_prompt=True)
    instruction = ('You have access to the following functions. To call a function, respond with JSON in the format '
                   '{"name": function name, "parameters": dictionary of argument name and its value}, '
                   'one call per line. Do not use variables.')
    compact = {"ensure_ascii": False, "separators": (",", ":")}
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"Environment: ipython\n\n{instruction}\n\n"
        f"{json.dumps(WEATHER_TOOL, **compact)}\n\n{json.dumps(TIME_TOOL, **compact)}\n\n"
        "你是一位耐心的中文老师。<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n北京的天气和时间？<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city":"北京"}}\n'
        '{"name": "get_time", "parameters": {"tz":"Asia/Shanghai"}}<|eom_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"temperature":3,"condition":"晴"}<|eot_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n["2025-01-01","08:00"]<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama31_tools_without_system_message_get_their_own_system_turn():
    text = templates.render("llama3.1", [{"role": "user", "content": "几点了？"}], tools=[TIME_TOOL])
    system_turn, user_turn = text.removeprefix(BOS).split("<|eot_id|>")[:2]
    assert system_turn.startswith("<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n\n")
    assert system_turn.endswith(json.dumps(TIME_TOOL, ensure_ascii=False, separators=(",", ":")))
    assert user_turn == "<|start_header_id|>user<|end_header_id|>\n\n几点了？"


def test_registry_render_drops_none_like_transformers(tokenizer):
    messages = [{"role": "user", "content": "你好", "name": None}, {"role": "assistant", "content": "你好！", "tool_calls": None}]
    text = templates.render("llama3.1", messages)
    assert "None" not in text
    assert text == tokenizer.apply_chat_template(messages, chat_template=templates.get("llama3.1").inference,
                                                 tokenize=False)


# --- generation markers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "messages", "tools"), cases())
def test_generation_spans_are_exactly_assistant_content_and_end_token(fmt, messages, tools):
    chat_format = templates.get(fmt)
    text, spans = hf_render(chat_format.training, messages, tools, wants_prompt(messages))
    marked = [text[start:end] for start, end in spans]
    assert marked == [expected_assistant_text(fmt, m) for m in messages if m["role"] == "assistant"]
    for piece in marked:
        assert not any(header in piece for header in HEADERS)
        assert not any(m["content"].strip() in piece for m in messages
                       if m["role"] in ("user", "system") and isinstance(m.get("content"), str))


@pytest.mark.parametrize(("fmt", "messages", "tools"), [p for p in cases() if any(
    m["role"] == "assistant" for m in p.values[1])])
def test_assistant_token_mask_decodes_to_assistant_turns(fmt, messages, tools, tokenizer):
    out = tokenizer.apply_chat_template(messages, tools=tools, chat_template=templates.get(fmt).training,
                                        return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    runs, current = [], []
    for token_id, masked in zip(ids, mask):
        if masked:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [tokenizer.decode(run) for run in runs] == [
        expected_assistant_text(fmt, m) for m in messages if m["role"] == "assistant"]


def test_inference_variant_has_no_generation_tags_and_training_has_them():
    for fmt in templates.names():
        chat_format = templates.get(fmt)
        assert not re.search(r"\{%-?\s*(end)?generation\s*-?%\}", chat_format.inference)
        assert len(re.findall(r"\{%-?\s*generation\s*-?%\}", chat_format.training)) == (2 if fmt == "llama3.1" else 1)
        assert chat_format.inference == templates.strip_generation_tags(chat_format.training)


def test_strip_generation_tags_handles_whitespace_control_forms():
    source = "a{% generation %}b{%- endgeneration -%}c{%-generation%}d{%endgeneration%}"
    assert templates.strip_generation_tags(source) == "abcd"


# --- BOS -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", templates.names())
def test_bos_only_from_the_template(fmt, tokenizer):
    chat_format = templates.get(fmt)
    messages = CHATS[2][1]
    text = templates.render(fmt, messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    if fmt == "chatml":
        assert chat_format.bos_token is None
        assert BOS not in text and bos_id not in ids
        assert text.startswith("<|im_start|>system\n")
    else:
        assert chat_format.bos_token == BOS
        assert text.startswith(BOS) and text.count(BOS) == 1
        assert ids[0] == bos_id and ids.count(bos_id) == 1
        # The template prints the BOS itself: a tokenizer with another (or no) bos_token changes nothing.
        assert render_jinja_template([messages], chat_template=chat_format.training)[0][0] == text
        # apply_chat_template tokenizes without special tokens too: one BOS even though the tokenizer adds one.
        chat_ids = tokenizer.apply_chat_template(messages, chat_template=chat_format.training, tokenize=True,
                                                 return_dict=False)
        assert chat_ids == ids


# --- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["llama3", "chatml"])
@pytest.mark.parametrize("message", [
    {"role": "tool", "content": "21度"},
    {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "上海"})]},
])
def test_formats_without_tools_reject_tool_messages(fmt, message):
    messages = [{"role": "user", "content": "上海天气？"}, message]
    with pytest.raises(jinja2.TemplateError, match="llama3.1"):
        templates.render(fmt, messages)
    with pytest.raises(jinja2.TemplateError, match="llama3.1"):
        render_jinja_template([messages], chat_template=templates.get(fmt).training)


def test_llama31_rejects_unknown_role_and_text_beside_tool_calls():
    with pytest.raises(jinja2.TemplateError, match="no role 'narrator'"):
        templates.render("llama3.1", [{"role": "narrator", "content": "从前……"}])
    with pytest.raises(jinja2.TemplateError, match="tool_calls"):
        templates.render("llama3.1", [{"role": "user", "content": "上海天气？"},
                                      {"role": "assistant", "content": "我查一下。",
                                       "tool_calls": [call("get_weather", {"city": "上海"})]}])


def test_get_unknown_name_lists_known_formats():
    with pytest.raises(KeyError) as error:
        templates.get("llama2")
    message = str(error.value)
    assert "llama2" in message
    assert all(name in message for name in ("llama3", "llama3.1", "chatml"))
    with pytest.raises(KeyError, match="known formats"):
        templates.render("qwen", [{"role": "user", "content": "你好"}])


# --- registry data -------------------------------------------------------------------------------------------


def test_names_and_entries():
    assert templates.names() == ["llama3", "llama3.1", "chatml"]
    for fmt in templates.names():
        chat_format = templates.get(fmt)
        assert chat_format.name == fmt
        assert chat_format.description
        assert chat_format.supports_tools == (fmt == "llama3.1")


def test_stop_tokens():
    headers = ("<|start_header_id|>", "<|end_header_id|>")
    assert templates.get("llama3").end_tokens == ("<|eot_id|>", "<|end_of_text|>")
    assert templates.get("llama3").stop_tokens == ("<|eot_id|>", "<|end_of_text|>", *headers)
    assert templates.get("llama3.1").end_tokens == ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
    assert templates.get("llama3.1").stop_tokens == ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", *headers)
    assert templates.get("chatml").stop_tokens == ("<|im_end|>", "<|endoftext|>", "<|im_start|>")
    for name in templates.names():
        fmt = templates.get(name)
        assert fmt.eos_token == fmt.end_tokens[0] == END_TOKEN[name]
        assert fmt.stop_tokens == fmt.end_tokens + fmt.guard_tokens
        # every guard opens a turn in the template: a reply that reaches one has started the next turn
        assert all(guard in fmt.training and guard in fmt.ollama for guard in fmt.guard_tokens)


@pytest.mark.parametrize("fmt", templates.names())
def test_default_system_prompt_is_chinese(fmt):
    default_system = templates.get(fmt).default_system
    cjk = [ch for ch in default_system if "\u4e00" <= ch <= "\u9fff"]
    assert len(cjk) >= 10
    assert "中文" in default_system
    # It renders as an ordinary system turn.
    assert default_system in templates.render(fmt, [{"role": "system", "content": default_system}])


@pytest.mark.parametrize(("template", "expected"), [
    pytest.param(META_LLAMA3_TEMPLATE, "llama3", id="llama3-instruct"),
    pytest.param(META_LLAMA31_SNIPPET, "llama3.1", id="llama3.1-instruct"),
    pytest.param(SMOLLM2_TEMPLATE, "chatml", id="smollm2"),
    pytest.param("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}", None, id="mistral"),
    pytest.param("", None, id="empty"),
    pytest.param(None, None, id="none"),
])
def test_detect(template, expected):
    assert templates.detect(template) == expected


@pytest.mark.parametrize("fmt", templates.names())
def test_detect_recognises_the_registry_templates(fmt):
    chat_format = templates.get(fmt)
    assert templates.detect(chat_format.training) == fmt
    assert templates.detect(chat_format.inference) == fmt


# --- Ollama templates (package data; executed by Go in another test) ----------------------------------------


@pytest.mark.parametrize("fmt", templates.names())
def test_ollama_template_loads(fmt):
    ollama = templates.get(fmt).ollama
    assert ollama.strip()
    assert ".Messages" in ollama
    assert END_TOKEN[fmt] in ollama
    assert BOS not in ollama
    assert ollama.rstrip().endswith("-}}")  # nothing after the last action reaches the prompt


def test_ollama_llama31_template_speaks_tools_like_the_jinja():
    ollama = templates.get("llama3.1").ollama
    instruction = re.search(r"set tool_instruction = '(.+?)' -%\}", templates.get("llama3.1").training).group(1)
    assert f"Environment: ipython\n\n{instruction}" in ollama
    call_line = ('{"name": "{{ .Function.Name }}", "parameters": '
                 '{{ if .Function.Arguments }}{{ json .Function.Arguments }}{{ else }}{}{{ end }}}')
    for needle in (".Tools", ".ToolCalls", "<|eom_id|>", "<|start_header_id|>ipython<|end_header_id|>", call_line):
        assert needle in ollama


def test_ollama_templates_are_installed_package_data():
    import importlib.resources

    files = importlib.resources.files("edgezh.modelfiles")
    assert sorted(p.name for p in files.iterdir() if p.name.endswith(".tmpl")) == sorted(
        f"{fmt}.tmpl" for fmt in templates.names())


def test_pyproject_lists_every_edgezh_package():
    """`packages` is explicit (package-dir maps modelfiles/ into edgezh), so a new subpackage must be added."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "edgezh").rglob("__init__.py")}
    assert on_disk <= set(config["packages"])
    assert config["package-dir"]["edgezh.modelfiles"] == "modelfiles"
    assert "*.tmpl" in config["package-data"]["edgezh.modelfiles"]
