"""Shared fixtures and helpers of the runtime, serve and TUI tests (no tests here).

GGUFs are converted once from the conftest's HF fixtures and cached under .cache/test-fixtures/runtime,
keyed by the source folder's file hashes and the GGUF writer's code, so a later session reuses them.
Import what a module needs: `from test_runtime_fixtures import tiny_gguf, ...`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import FIXTURES, TINY_RECIPE

RUNTIME_FIXTURES = FIXTURES / "runtime"


def cached_gguf(model_dir: Path, template: str, outtype: str = "f16") -> Path:
    """`model_dir` converted by edgezh's GGUF writer, cached by content."""
    import edgezh.export.gguf_writer as writer

    manifest = json.loads((model_dir / "manifest.json").read_text(encoding="utf-8"))
    key = hashlib.sha256(json.dumps([manifest.get("files"), template, outtype,
                                     hashlib.sha256(Path(writer.__file__).read_bytes()).hexdigest()],
                                    sort_keys=True).encode()).hexdigest()[:16]
    out = RUNTIME_FIXTURES / f"{model_dir.parent.name}-{template}-{outtype}-{key}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        writer.convert(model_dir, out, outtype, template=template)
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tiny_llama3: Path) -> Path:
    """Random tiny Llama 3, f16, llama3 template."""
    return cached_gguf(tiny_llama3, "llama3")


@pytest.fixture(scope="session")
def tiny31_gguf(tiny_llama3: Path) -> Path:
    """The same weights with the llama3.1 (tools) template."""
    return cached_gguf(tiny_llama3, "llama3.1")


@pytest.fixture(scope="session")
def smollm2_f16_gguf(smollm2: Path) -> Path:
    """SmolLM2-135M-Instruct, real weights, f16, chatml: coherent answers."""
    return cached_gguf(smollm2, "chatml")


@pytest.fixture(scope="session")
def smollm2_q4_gguf(smollm2_f16_gguf: Path) -> Path:
    """SmolLM2 quantized by llama.cpp to q4_k_m (Q4_K: the weights llama.cpp repacks on the CPU)."""
    from edgezh.export.quantize import quantize

    out = smollm2_f16_gguf.with_name(smollm2_f16_gguf.stem + "-q4_k_m.gguf")
    if not out.is_file():
        quantize(smollm2_f16_gguf, out, "q4_k_m")
    return out


@pytest.fixture(scope="session")
def tiny_build() -> Path:
    """The tiny-llama3 recipe built in full by the pipeline (cached): manifests, q4_k_m, q8_0, Modelfiles."""
    from edgezh.pipeline import make_plan, run_plan
    from edgezh.recipe_load import load_recipe

    root = FIXTURES / "runtime-build"
    plan = make_plan(load_recipe(TINY_RECIPE, [f"output.root={root}"]))
    run_plan(plan)
    return root / "tiny-llama3"


_ENGINES: dict[tuple, Any] = {}


def engine_for(path: Path, **options: Any):
    """A loaded engine, shared by every test in the session that asks for the same file and options."""
    from edgezh.runtime.engine import Engine

    key = (str(path), tuple(sorted(options.items())))
    engine = _ENGINES.get(key)
    if engine is None:
        engine = _ENGINES[key] = Engine.load(path, n_threads=2, **options)
    return engine


@functools.lru_cache(maxsize=None)
def hf_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@functools.lru_cache(maxsize=1)
def chinese_lines() -> list[str]:
    from edgezh.data.corpora import peoples_daily

    return [line for line in peoples_daily(max_chars=20000).splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThreadServer:
    """The API on 127.0.0.1 in a uvicorn thread of this process; `stop()` always ends it."""

    def __init__(self, engine: Any, **config: Any):
        import uvicorn

        from edgezh.runtime.server import ServerConfig, create_app

        self.port = free_port()
        self.app = create_app(engine, ServerConfig(**config))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.stop()
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- a scripted model for the tool loop ---------------------------------------------------------------

@dataclass
class _ScriptedGeneration:
    """What `Engine.chat` returns, with a fixed text: pieces of its real tokens, streamed."""

    engine: Any
    prompt: list[int]
    params: Any
    script: str
    dropped: int = 0

    def __post_init__(self) -> None:
        from edgezh.runtime.decoding import StopStrings, Utf8Stream
        from edgezh.runtime.engine import Stats

        self.text, self.finish_reason, self.stop_token = "", "stop", None
        self.tokens = self.engine.tokenize(self.script, special=False)
        self.stats = Stats(prompt_tokens=len(self.prompt), completion_tokens=len(self.tokens), n_ctx=self.engine.n_ctx,
                           ttft_s=0.0, decode_tps=None)
        self._stream, self._stops = Utf8Stream(), StopStrings(self.params.stop)
        self.cancel = threading.Event()

    def __iter__(self) -> Iterator[str]:
        parts = []
        for token in self.tokens:
            delta = self._stops.feed(self._stream.feed(self.engine.pieces(token)))
            if delta:
                parts.append(delta)
                yield delta
            if self._stops.hit:
                self.stop_token = self._stops.hit
                break
        tail = self._stops.flush() if not self._stops.hit else ""
        if tail:
            parts.append(tail)
            yield tail
        self.text = "".join(parts)

    def deltas(self, every: float) -> Iterator[str]:
        return iter(self)

    def result(self) -> str:
        for _ in self:
            pass
        return self.text


class ScriptedEngine:
    """A real engine (format, tokenizer, prompt fitting) whose answers are read from a script: the
    model output a tool-loop test needs, without depending on what random weights would say."""

    def __init__(self, engine: Any, script: list[str]):
        self.engine = engine
        self.script = list(script)
        self.prompts: list[list[dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def chat(self, messages: list[dict[str, Any]], params: Any, *, tools: Any = None, cancel: Any = None,
             allow_drop: bool = True, adapters: str | None = None) -> _ScriptedGeneration:
        self.engine._check(params)
        tokens, dropped = self.engine.fit(messages, tools, reserve=params.max_tokens, allow_drop=allow_drop)
        self.prompts.append(messages)
        return _ScriptedGeneration(self.engine, tokens, params, self.script.pop(0), dropped)


def grammar_for(text: str) -> str:
    """A GBNF grammar whose only sentence is `text` (llama.cpp then must write exactly that)."""
    return "root ::= " + json.dumps(text, ensure_ascii=False)


def scripted(params: Any, text: str) -> Any:
    return replace(params, grammar=grammar_for(text))
