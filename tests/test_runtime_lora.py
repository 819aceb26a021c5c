"""LoRA adapter sets at runtime (`--lora`), on the tiny Llama 3 with real llama.cpp: an adapter set changes
the answer and the engine gives what llama.cpp gives with the adapter applied directly; base and sets decode
side by side in one context with the answers they get alone; serve offers each set as a model id (official
openai client, concurrent streams); bad --lora specs are one error line, exit 2; the TUI switches sets with
Ctrl+L and the plain chat with /lora."""

from __future__ import annotations

import asyncio
import io
import re
import threading
from pathlib import Path

import openai
import pytest

from edgezh.cli import main
from edgezh.export import lora_gguf
from edgezh.runtime.adapters import AdapterSet, parse_spec, parse_specs
from edgezh.runtime.engine import Engine, SamplingParams
from test_merge import load_base, save_adapter, variant_configs
from test_runtime_fixtures import ThreadServer, engine_for, tiny_gguf  # noqa: F401

GREEDY = SamplingParams(max_tokens=24, temperature=0)
QUESTION = [{"role": "user", "content": "请介绍一下北京。"}]


@pytest.fixture(scope="module")
def lora_files(tiny_llama3: Path, tmp_path_factory) -> dict[str, Path]:
    """Two adapter GGUFs (all-linear, random factors, different seeds) for the tiny Llama 3."""
    root = tmp_path_factory.mktemp("runtime-lora")
    out = {}
    for seed, name in enumerate(("zh", "math"), start=11):
        folder = save_adapter(load_base(tiny_llama3), variant_configs()["all_linear"], root / name, seed=seed)
        out[name] = root / f"{name}.gguf"
        lora_gguf.convert(tiny_llama3, folder, out[name], "f16")
    return out


@pytest.fixture(scope="module")
def sets(lora_files) -> tuple[AdapterSet, ...]:
    return parse_specs([f"zh={lora_files['zh']}:0.8", f"{lora_files['zh']}:0.5,{lora_files['math']}"])


@pytest.fixture(scope="module")
def lora_engine(tiny_gguf: Path, sets) -> Engine:
    return engine_for(tiny_gguf, parallel=2, n_ctx=512, adapters=sets)


def direct_tokens(path: Path, adapters: list[tuple[Path, float]], prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of llama-cpp-python's own `Llama` with the adapters attached (lora_gguf.attach)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, n_threads_batch=2, n_gpu_layers=0, flash_attn=True,
                          verbose=False)  # flash attention as the engine computes
    try:
        if adapters:
            lora_gguf.attach(llm, adapters)
        out = []
        for token in llm.generate(prompt, temp=0, repeat_penalty=GREEDY.repeat_penalty, top_k=GREEDY.top_k,
                                  top_p=GREEDY.top_p, min_p=GREEDY.min_p):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(out) == n:
                break
            out.append(token)
        return out
    finally:
        llm.close()


# ---------------------------------------------------------------- specs


def test_spec_parsing() -> None:
    assert parse_spec("a/zh.gguf") == AdapterSet("zh", ((Path("a/zh.gguf"), 1.0),))
    assert parse_spec("mix=a/zh.gguf:0.8, b/math.gguf:-0.5") == AdapterSet(
        "mix", ((Path("a/zh.gguf"), 0.8), (Path("b/math.gguf"), -0.5)))
    assert parse_spec("zh.gguf,math.gguf:2").name == "zh+math"
    assert parse_spec(r"C:\lora\zh.gguf").adapters == ((Path(r"C:\lora\zh.gguf"), 1.0),)
    assert parse_spec("x=zh.gguf:0.8").label() == "x ×0.8"


# ---------------------------------------------------------------- the engine


def test_an_adapter_set_is_llama_cpp_with_the_adapter_applied(lora_engine: Engine, tiny_gguf: Path, sets,
                                                              lora_files) -> None:
    assert [s.name for s in lora_engine.adapter_sets] == ["zh", "zh+math"]
    base = lora_engine.chat(QUESTION, GREEDY)
    base.result()
    zh = lora_engine.chat(QUESTION, GREEDY, adapters="zh")
    zh.result()
    both = lora_engine.chat(QUESTION, GREEDY, adapters="zh+math")
    both.result()
    assert len(zh.tokens) > 4 and zh.tokens != base.tokens and both.tokens != zh.tokens  # the adapters change it
    n = GREEDY.max_tokens
    assert zh.tokens == direct_tokens(tiny_gguf, [(lora_files["zh"], 0.8)], zh.prompt, n)
    assert both.tokens == direct_tokens(tiny_gguf, [(lora_files["zh"], 0.5), (lora_files["math"], 1.0)], both.prompt, n)
    assert base.tokens == direct_tokens(tiny_gguf, [], base.prompt, n)
    again = lora_engine.chat(QUESTION, GREEDY)  # back to the base after the sets
    again.result()
    assert again.tokens == base.tokens
    with pytest.raises(Exception, match=r"no LoRA adapter set 'nope' \(loaded: zh, zh\+math\)"):
        lora_engine.chat(QUESTION, GREEDY, adapters="nope")


def test_base_and_sets_decode_together_with_the_answers_they_get_alone(lora_engine: Engine) -> None:
    alone = {name: lora_engine.chat(QUESTION, GREEDY, adapters=name).result() for name in (None, "zh", "zh+math")}
    for pair in ((None, "zh"), ("zh", "zh+math"), ("zh+math", None)):
        generations = [lora_engine.chat(QUESTION, GREEDY, adapters=name).start() for name in pair]
        for generation in generations:
            assert generation.wait(120)
        assert [g.text for g in generations] == [alone[name] for name in pair]


# ---------------------------------------------------------------- serve


def test_serve_offers_each_set_as_a_model_and_streams_them_concurrently(lora_engine: Engine) -> None:
    with ThreadServer(lora_engine, model_id="tiny") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["tiny", "tiny:zh", "tiny:zh+math"]

        def stream(model: str) -> str:
            chunks = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=24, temperature=0,
                                                    stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        alone = {model: stream(model) for model in ("tiny", "tiny:zh")}
        assert alone["tiny"] != alone["tiny:zh"]
        together: dict[str, str] = {}
        threads = [threading.Thread(target=lambda m=m: together.__setitem__(m, stream(m))) for m in alone]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert together == alone
        reply = client.completions.create(model="tiny:zh+math", prompt="北京", max_tokens=8, temperature=0)
        assert reply.model == "tiny:zh+math"
        with pytest.raises(openai.NotFoundError, match="tiny:nope.*does not exist"):
            client.chat.completions.create(model="tiny:nope", messages=QUESTION, max_tokens=4)


# ---------------------------------------------------------------- bad --lora


@pytest.fixture(scope="module")
def bad_adapters(tmp_path_factory) -> dict[str, Path]:
    """Adapter GGUFs llama.cpp or edgezh must refuse: another architecture, and a tensor of the wrong shape."""
    import gguf
    import numpy as np

    root = tmp_path_factory.mktemp("bad-lora")
    out = {}
    for name, arch, shape in (("qwen", "qwen2", (4, 256)), ("shape", "llama", (4, 100))):
        writer = gguf.GGUFWriter(root / f"{name}.gguf", arch)
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", 8.0)
        writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros(shape, np.float32))
        writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((256, 4), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        out[name] = root / f"{name}.gguf"
    return out


@pytest.mark.parametrize("case", ["missing", "base", "arch", "scale", "duplicate", "refused"])
def test_bad_lora_specs_exit_2_with_one_line(case, tiny_gguf: Path, lora_files, bad_adapters, tmp_path, capsys) -> None:
    spec, expected = {
        "missing": (tmp_path / "nope.gguf", "--lora {}: no such file"),
        "base": (tiny_gguf, r"--lora {}: not a LoRA adapter GGUF \(general.type is (model|missing)"),
        "arch": (bad_adapters["qwen"], "--lora {}: an adapter for qwen2, but .* is llama"),
        "scale": (f"{lora_files['zh']}:big", "scale 'big' is not a number"),
        "duplicate": (f"{lora_files['zh']},{lora_files['math']}", r"two adapter sets are named 'zh\+math'"),
        "refused": (bad_adapters["shape"], r"{}: llama.cpp cannot put this LoRA adapter on .*: "
                                           r"tensor 'blk\.0\.attn_q\.weight' has incorrect shape"),
    }[case]
    expected, spec = expected.replace("{}", re.escape(str(spec))), str(spec)
    extra = ["--lora", spec] * (2 if case == "duplicate" else 1)
    for command in (["chat", str(tiny_gguf), "--plain", *extra], ["serve", str(tiny_gguf), "--port", "1", *extra]):
        code = main([*command, "--threads", "2"])
        out, err = capsys.readouterr()
        assert code == 2 and out == "", (out, err)
        assert re.fullmatch(rf"error: .*{expected}.*\n", err), err


# ---------------------------------------------------------------- the chats


def test_tui_ctrl_l_switches_the_set_and_the_next_answer_uses_it(lora_engine: Engine, tmp_path: Path) -> None:
    from edgezh.tui import ChatApp, ChatConfig
    from test_tui import SIZE, answers, type_text, until

    async def scenario() -> None:
        app = ChatApp(ChatConfig(model=Path(lora_engine.path), history=tmp_path / "chat.jsonl", threads=2,
                                 params=GREEDY), engine=lora_engine)
        async with app.run_test(size=SIZE) as pilot:
            status = lambda: str(app.query_one("#status").render())  # noqa: E731
            assert "LoRA: off" in status()
            await pilot.press("ctrl+l")
            assert app.session.adapters == "zh" and "LoRA: zh ×0.8" in status()
            await type_text(pilot, "你好")
            await pilot.press("enter")
            await until(pilot, lambda: not app.generating and answers(app), timeout=120, what="the answer")
            assert "LoRA: zh ×0.8" in status() and app.session.messages[-1]["meta"]["lora"] == "zh"
            messages = [{k: v for k, v in m.items() if k != "meta"} for m in app.session.messages[:-1]]
            assert app.session.messages[-1]["content"] == lora_engine.chat(messages, GREEDY, adapters="zh").result()
            assert app.session.messages[-1]["content"] != lora_engine.chat(messages, GREEDY).result()
            await pilot.press("ctrl+l", "ctrl+l")
            assert app.session.adapters is None and "LoRA: off" in status()

    asyncio.run(scenario())


def test_plain_chat_lora_command(lora_engine: Engine) -> None:
    from edgezh.runtime.chat import ChatSession
    from edgezh.runtime.plain import _switch_lora

    session = ChatSession(lora_engine)
    assert _switch_lora(session, "zh") == "LoRA: zh ×0.8 (sets: zh, zh+math; /lora NAME|off)"
    assert session.adapters == "zh"
    assert _switch_lora(session, "nope").startswith("error: no LoRA adapter set 'nope'") and session.adapters == "zh"
    assert _switch_lora(session, "off").startswith("LoRA: off") and session.adapters is None


def test_plain_chat_reads_lora_lines(tiny_gguf: Path, sets, tmp_path: Path) -> None:
    from edgezh.runtime.plain import plain_chat

    engine = Engine.load(tiny_gguf, n_threads=2, n_ctx=512, adapters=sets)  # plain_chat closes it
    expected = engine.chat([{"role": "user", "content": "你好"}], GREEDY, adapters="zh").result()
    stdout, stderr = io.StringIO(), io.StringIO()
    plain_chat(engine, GREEDY, system="", history=tmp_path / "chat.jsonl", stdin=io.StringIO("/lora zh\n你好\n"),
               stdout=stdout, stderr=stderr)
    assert stdout.getvalue() == expected + "\n"
    assert "LoRA: zh ×0.8" in stderr.getvalue()
