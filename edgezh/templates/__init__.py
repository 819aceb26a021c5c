"""Chat-template registry: the single source of truth for every chat format edgezh speaks.

One entry per format (``llama3``, ``llama3.1``, ``chatml``). Each entry carries:

- ``training``: the jinja template from ``edgezh/templates/<name>.jinja``. Every assistant message's content
  *and its end-of-turn token* sit inside ``{% generation %}...{% endgeneration %}`` (the header stays
  outside), so transformers' ``return_assistant_tokens_mask`` marks exactly what the model is trained to say.
- ``inference``: derived from ``training`` by deleting the generation tags; the templates are written so
  that both render byte-identical text. There is no second copy.
- ``ollama``: the Ollama TEMPLATE body (Go text/template) from ``modelfiles/<name>.tmpl``, installed as
  package data under ``edgezh.modelfiles``. It is emitted verbatim into Modelfiles.
- stop tokens, the BOS rule, a default Chinese system prompt.

Stop tokens. ``end_tokens`` end a turn or the text (the model is trained to write them; a GGUF's EOS/EOT id is
the first one, and llama.cpp treats all of them as end of generation). ``stop_tokens`` adds ``guard_tokens``:
tokens that never belong in a reply but open the next turn. For llama3/llama3.1 those are the header tokens
``<|start_header_id|>`` and ``<|end_header_id|>``, which Ollama's own library models stop on too (its
``template/llama3-instruct.json`` params: ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>``): a
fine-tune that starts a new header without ending its turn stops there instead of answering itself. ChatML's
guard is ``<|im_start|>`` (Ollama's ``template/chatml.json``: ``<|im_start|>``, ``<|im_end|>``). Every
consumer that stops generation (Modelfile ``PARAMETER stop``, the llama.cpp runtime, greedy eval replies) takes
``stop_tokens``. A GGUF has no stop list, only single EOS/EOT/EOM id slots: the writer puts the first end token
in EOS and EOT, llama.cpp recognizes the other end tokens as end of generation by their text, and the guards stay
out of those slots (a header is not the end of a text); the Modelfile and edgezh's runtime add them.

BOS rule. The llama3/llama3.1 jinja templates print ``<|begin_of_text|>`` themselves, so text rendered from
them must be tokenized WITHOUT adding special tokens (``add_special_tokens=False``): exactly one BOS.
ChatML has no BOS. The Ollama templates never print ``<|begin_of_text|>``: Ollama (llama.cpp) prepends the
BOS itself when the GGUF's ``tokenizer.ggml.add_bos_token`` is set, so with the jinja BOS removed the two
render the same text.

Jinja vs Ollama. For the same conversation, where the jinja gets ``add_generation_prompt=True`` exactly
when the last message is not from the assistant (the Go templates emit the generation prompt then), the
Go template renders the jinja text minus the leading BOS, with these known limits of Go templates/Ollama:

- Go templates cannot trim: llama3/llama3.1 trim message content (Meta's format), Ollama prints it as is.
  Identical for content without leading/trailing whitespace.
- JSON (tools, tool-call arguments, dict tool results) is compact (``separators=(',', ':')``) as Go's
  ``json.Marshal``; keys keep the caller's order in jinja, Ollama prints tools in its struct field order
  (type, function: name, description, parameters: type, required, properties) and escapes ``<>&`` as
  ``\\u003c`` etc. Ollama sorts tool-call argument keys at every level and the top-level tool
  ``properties``; it always prints a tool's ``description`` (``""`` when absent) and drops schema keys it
  does not model (``minimum``, ``default``). Tool-call ``arguments`` given as a JSON string are inserted
  verbatim by the jinja.
- Ollama merges consecutive messages of the same role (except role ``tool``; consecutive ``ipython``
  results are merged) before rendering. An assistant text turn directly followed by an assistant
  tool-call turn is merged by Ollama, which keeps the text and drops the calls; the jinja refuses text
  and calls in one turn, so a conversation should not put those two turns back to back
  (tests/test_template_truth.py pins each of these differences).
- A final assistant message keeps its end token in both (no "continue this reply" prefill).

llama3.1 tools layout. With ``tools``, the first turn is a system turn:
``Environment: ipython`` + an instruction to answer a call as ``{"name": ..., "parameters": {...}}`` + one
tool JSON per paragraph + the first system message (if the conversation starts with one). An assistant
turn with several ``tool_calls`` renders one JSON object per line, ``\\n``-separated, then ``<|eom_id|>``;
such a turn may not also carry text content (the template raises). Tool results (role ``tool`` or
``ipython``) render as ``ipython`` turns.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatFormat", "detect", "get", "names", "render", "strip_generation_tags"]

LLAMA3_BOS = "<|begin_of_text|>"

_DEFAULT_SYSTEM_ZH = (
    "你是一个乐于助人、诚实可靠的AI助手。请用简体中文回答，除非用户要求使用其他语言。"
    "回答要准确、清楚、简洁；不确定时请如实说明。"
)

_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


@dataclass(frozen=True)
class ChatFormat:
    """One chat format: its templates (jinja for transformers/GGUF, Go for Ollama) and token rules."""

    name: str
    """Registry name: "llama3", "llama3.1" or "chatml"."""
    training: str
    """Jinja template with ``{% generation %}`` around each assistant message's content and end token."""
    inference: str = field(init=False)
    """Jinja template for inference: ``training`` with the generation tags removed (derived)."""
    ollama: str
    """Ollama TEMPLATE body (Go text/template); never prints the BOS (Ollama adds it)."""
    end_tokens: tuple[str, ...]
    """Tokens that end a model turn or the text; the first is the end of an assistant reply."""
    guard_tokens: tuple[str, ...]
    """Tokens that start the next turn: generation stops on them as well (see the module docstring)."""
    stop_tokens: tuple[str, ...] = field(init=False)
    """Every token generation stops on: ``end_tokens`` then ``guard_tokens`` (derived)."""
    bos_token: str | None
    """The BOS the template itself prints at the very start, or None; rendered text is tokenized without
    adding special tokens."""
    default_system: str
    """Default system prompt (Simplified Chinese)."""
    supports_tools: bool
    """Whether the template renders ``tools``, tool calls and tool results."""
    description: str
    """One line for humans (CLI listings, docs)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "inference", strip_generation_tags(self.training))
        object.__setattr__(self, "stop_tokens", self.end_tokens + self.guard_tokens)

    @property
    def eos_token(self) -> str:
        """The end-of-turn token of an assistant reply (the first end token)."""
        return self.end_tokens[0]


@dataclass(frozen=True)
class _Spec:
    """What the registry knows about a format besides its template files."""

    end_tokens: tuple[str, ...]
    guard_tokens: tuple[str, ...]
    bos_token: str | None
    supports_tools: bool
    description: str


_LLAMA3_HEADERS = ("<|start_header_id|>", "<|end_header_id|>")

_SPECS: dict[str, _Spec] = {
    "llama3": _Spec(
        end_tokens=("<|eot_id|>", "<|end_of_text|>"),
        guard_tokens=_LLAMA3_HEADERS,
        bos_token=LLAMA3_BOS,
        supports_tools=False,
        description="Meta Llama 3 Instruct (<|start_header_id|> headers, <|eot_id|>), no tools",
    ),
    "llama3.1": _Spec(
        end_tokens=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
        guard_tokens=_LLAMA3_HEADERS,
        bos_token=LLAMA3_BOS,
        supports_tools=True,
        description="Llama 3.1+ Instruct with JSON tool calls (<|eom_id|>) and ipython tool results",
    ),
    "chatml": _Spec(
        end_tokens=("<|im_end|>", "<|endoftext|>"),
        guard_tokens=("<|im_start|>",),
        bos_token=None,
        supports_tools=False,
        description="ChatML (<|im_start|>role ... <|im_end|>), no BOS, no tools; e.g. SmolLM2, Qwen",
    ),
}


def strip_generation_tags(template: str) -> str:
    """Remove ``{% generation %}`` / ``{% endgeneration %}`` (and their ``{%- -%}`` forms) from a template."""
    return _GENERATION_TAG.sub("", template)


def names() -> list[str]:
    """The registered format names, in registry order."""
    return list(_SPECS)


@lru_cache(maxsize=None)
def get(name: str) -> ChatFormat:
    """The format called ``name``; an unknown name raises KeyError listing the known ones."""
    spec = _SPECS.get(name)
    if spec is None:
        raise KeyError(f"unknown chat format {name!r}; known formats: {', '.join(names())}")
    return ChatFormat(
        name=name,
        training=_read_resource("edgezh.templates", f"{name}.jinja"),
        ollama=_read_resource("edgezh.modelfiles", f"{name}.tmpl"),
        end_tokens=spec.end_tokens,
        guard_tokens=spec.guard_tokens,
        bos_token=spec.bos_token,
        default_system=_DEFAULT_SYSTEM_ZH,
        supports_tools=spec.supports_tools,
        description=spec.description,
    )


def detect(chat_template: str | None) -> str | None:
    """Guess the registry format of a model's own jinja chat template; None when it is none of ours."""
    if not chat_template:
        return None
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        if any(marker in chat_template for marker in ("tools", "ipython", "<|eom_id|>")):
            return "llama3.1"
        return "llama3"
    return None


def render(
    name: str,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """Render ``messages`` with the format's inference template, byte for byte as transformers'
    ``apply_chat_template(..., tokenize=False)`` does (keys whose value is None are dropped first, as there).
    Bad input (a tool message in a format without tools, an unknown role) raises ``jinja2.TemplateError``
    with the template's message."""
    fmt = get(name)
    return _compiled_inference(name).render(
        messages=[_drop_none(message) for message in messages],
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        bos_token=fmt.bos_token or "",
        eos_token=fmt.eos_token,
    )


def _drop_none(message: dict[str, Any]) -> dict[str, Any]:
    """The message without keys whose value is None (``content=None`` beside tool calls), as transformers does."""
    return {key: value for key, value in message.items() if value is not None}


def _read_resource(package: str, filename: str) -> str:
    """Text of a package-data file."""
    return importlib.resources.files(package).joinpath(filename).read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def _compiled_inference(name: str) -> jinja2.Template:
    """The format's inference template compiled in a sandbox configured like transformers'."""
    return _jinja_environment().from_string(get(name).inference)


@lru_cache(maxsize=1)
def _jinja_environment() -> ImmutableSandboxedEnvironment:
    """A sandboxed environment with the same whitespace rules and helpers as transformers' chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' ``tojson``: plain ``json.dumps`` (no HTML escaping), non-ASCII kept."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    """``raise_exception(...)`` inside a template: a TemplateError carrying the template's message."""
    raise jinja2.TemplateError(message)
