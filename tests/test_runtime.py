"""The runtime engine on real GGUFs: loading errors, formats and BOS, stops, streaming, stats,
cancel, context overflow, UTF-8-safe decoding against the HF tokenizers, build folders."""

from __future__ import annotations

import random
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from edgezh import templates
from edgezh.errors import UserError
from edgezh.runtime.decoding import StopStrings, Utf8Stream
from edgezh.runtime.engine import Engine, SamplingParams
from edgezh.runtime.model_source import resolve
from test_runtime_fixtures import (chinese_lines, engine_for, hf_tokenizer, smollm2_f16_gguf, tiny31_gguf, tiny_build,  # noqa: F401
                                   tiny_gguf)

CHAT = [{"role": "user", "content": "你好，请用一句话介绍北京。"}]


# --- loading --------------------------------------------------------------------------------------------

def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        Engine.load(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(UserError, match="not a GGUF file"):
        Engine.load(path)


def test_truncated_gguf_is_reported_as_corrupt(tiny_gguf: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    with open(tiny_gguf, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(tiny_gguf.stat().st_size // 3))
    with pytest.raises(UserError) as caught:
        Engine.load(path, n_threads=2)
    message = str(caught.value)
    assert "corrupt or truncated" in message and "\n" not in message


def test_truncated_header_is_reported_before_llama_cpp(tiny_gguf: Path, tmp_path: Path) -> None:
    path = tmp_path / "header.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[:5000])
    with pytest.raises(UserError, match="corrupt or truncated GGUF"):
        Engine.load(path)


def test_context_too_big_for_memory_is_a_clear_error(tiny_gguf: Path) -> None:
    with pytest.raises(UserError, match="not enough memory for a .*-token context"):
        Engine.load(tiny_gguf, n_ctx=30_000_000, n_threads=2)


def test_unknown_embedded_template_asks_for_template(tiny_gguf: Path, tmp_path: Path) -> None:
    """A GGUF whose template is none of the registry's formats is refused with a way out."""
    path = tmp_path / "odd.gguf"
    shutil.copy(tiny_gguf, path)
    with open(path, "r+b") as handle:  # rewrite the embedded template in place: same length, other markers
        head = handle.read(8 << 20)
        at = head.index(b"tokenizer.chat_template")
        handle.seek(at)
        handle.write(head[at:].replace(b"<|start_header_id|>", b"[[start_header_xx]]"))
    with pytest.raises(UserError, match="pass --template"):
        Engine.load(path, n_threads=2)
    assert Engine.load(path, template="llama3", n_threads=2, n_ctx=128).format.name == "llama3"


def test_gpu_layers_auto_follows_llama_cpp() -> None:
    import llama_cpp

    from edgezh.runtime.engine import gpu_offload_supported

    assert gpu_offload_supported() == bool(llama_cpp.llama_supports_gpu_offload())


def test_auto_gpu_layers_on_this_build(tiny_gguf: Path) -> None:
    import llama_cpp

    engine = engine_for(tiny_gguf)
    assert engine.n_gpu_layers == (-1 if llama_cpp.llama_supports_gpu_offload() else 0)


# --- formats, prompts, BOS ------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture, fmt", [("tiny_gguf", "llama3"), ("tiny31_gguf", "llama3.1"),
                                          ("smollm2_f16_gguf", "chatml")])
def test_format_detected_from_embedded_template_and_exactly_one_bos(fixture: str, fmt: str,
                                                                    request: pytest.FixtureRequest) -> None:
    engine = engine_for(request.getfixturevalue(fixture))
    assert engine.format.name == fmt
    tokens = engine.prompt_tokens([{"role": "system", "content": "系统"}, *CHAT])
    if fmt == "chatml":
        assert engine.bos_id is None or tokens.count(engine.bos_id) == 0
        assert engine.detokenize(tokens[:1]) == ""  # <|im_start|> is one special token
    else:
        bos = engine.bos_id
        assert bos is not None and tokens[0] == bos and tokens.count(bos) == 1
    # special tokens of the template are single tokens, not spelled out
    text = templates.render(fmt, [{"role": "system", "content": "系统"}, *CHAT], add_generation_prompt=True)
    assert len(tokens) < len(engine.tokenize(text, special=False))


def test_stop_ids_are_every_stop_token_of_the_format(tiny31_gguf: Path) -> None:
    engine = engine_for(tiny31_gguf)
    assert {engine.token_text(i) for i in engine.stop_ids} == set(templates.get("llama3.1").stop_tokens)


# --- generation -----------------------------------------------------------------------------------------

def test_streams_deltas_that_add_up_with_stats(smollm2_f16_gguf: Path) -> None:
    engine = engine_for(smollm2_f16_gguf)
    generation = engine.chat(CHAT, SamplingParams(max_tokens=24, seed=1, temperature=0))
    deltas = list(generation)
    assert len(deltas) > 1 and "".join(deltas) == generation.text
    stats = generation.stats
    assert stats.prompt_tokens == len(generation.prompt) and stats.completion_tokens == len(generation.tokens)
    assert stats.completion_tokens <= 24 and stats.ttft_s is not None and stats.ttft_s > 0
    assert stats.context_used == stats.prompt_tokens + stats.completion_tokens
    assert "tok/s" in stats.summary() and f"/{engine.n_ctx}" in stats.summary()
    assert generation.finish_reason in ("stop", "length")
    if generation.finish_reason == "stop":
        assert generation.stop_token in templates.get("chatml").stop_tokens


def test_coalesced_deltas_are_the_same_text_in_fewer_pieces(tiny_gguf: Path) -> None:
    engine = engine_for(tiny_gguf)
    params = SamplingParams(max_tokens=64, seed=5, temperature=0.8)
    alone = engine.chat(CHAT, params)
    pieces = list(alone)
    generation = engine.chat(CHAT, params)
    coalesced = generation.deltas(0.01)
    first = next(coalesced)
    generation.wait(60)  # everything decoded meanwhile comes as one delta
    rest = list(coalesced)
    assert len(pieces) > 5 and len(rest) <= 1
    assert first + "".join(rest) == generation.text == alone.text and generation.tokens == alone.tokens
    stopped = engine.chat(CHAT, replace(params, max_tokens=1000))
    for _ in stopped.deltas(0.01):
        break  # a consumer that leaves early cancels the generation
    stopped.wait(10)
    assert stopped.finish_reason == "cancelled"


def test_same_seed_same_answer(tiny_gguf: Path) -> None:
    engine = engine_for(tiny_gguf)
    params = SamplingParams(max_tokens=12, seed=7, temperature=0.9)
    first, second = engine.chat(CHAT, params).result(), engine.chat(CHAT, params).result()
    assert first == second


def test_stops_on_the_format_stop_token(smollm2_f16_gguf: Path) -> None:
    """SmolLM2 answers a short question and ends with <|im_end|>: the token never reaches the text."""
    engine = engine_for(smollm2_f16_gguf)
    generation = engine.chat([{"role": "user", "content": "What is the capital of France? One word."}],
                             SamplingParams(max_tokens=40, temperature=0))
    text = generation.result()
    assert generation.finish_reason == "stop" and generation.stop_token == "<|im_end|>"
    assert "Paris" in text and "<|im_end|>" not in text


def test_forced_output_ends_at_a_stop_token(tiny31_gguf: Path) -> None:
    """A grammar makes llama.cpp write a tool call; the generation ends at one of the format's stop tokens."""
    from test_runtime_fixtures import grammar_for

    engine = engine_for(tiny31_gguf)
    generation = engine.chat(CHAT, SamplingParams(max_tokens=30, temperature=0, grammar=grammar_for('{"name": "x"}')))
    assert generation.result() == '{"name": "x"}'
    assert generation.finish_reason == "stop" and generation.stop_token in templates.get("llama3.1").stop_tokens


def test_stop_strings_end_the_text_before_them(tiny_gguf: Path) -> None:
    from test_runtime_fixtures import grammar_for

    engine = engine_for(tiny_gguf)
    params = SamplingParams(max_tokens=40, temperature=0, stop=("Observation:",),
                            grammar=grammar_for("Action: x\nObservation: y"))
    generation = engine.chat(CHAT, params)
    assert generation.result() == "Action: x\n" and generation.stop_token == "Observation:"


def test_cancel_mid_stream(tiny_gguf: Path) -> None:
    engine = engine_for(tiny_gguf)
    cancel = threading.Event()
    generation = engine.chat(CHAT, SamplingParams(max_tokens=1000, seed=3), cancel=cancel)
    for index, _ in enumerate(generation):
        if index == 5:
            cancel.set()
    assert generation.finish_reason == "cancelled" and 5 <= len(generation.tokens) < 20
    assert engine.chat(CHAT, SamplingParams(max_tokens=3)).result() is not None  # the engine is free again


def test_invalid_sampling_and_grammar_are_user_errors(tiny_gguf: Path) -> None:
    engine = engine_for(tiny_gguf)
    with pytest.raises(UserError, match="top_p"):
        engine.chat(CHAT, SamplingParams(top_p=0))
    with pytest.raises(UserError, match="invalid GBNF grammar"):
        engine.chat(CHAT, SamplingParams(grammar="root ::= undefined-rule"))


def test_context_overflow_drops_oldest_turns_and_keeps_system(tiny_gguf: Path) -> None:
    engine = engine_for(tiny_gguf, n_ctx=256)
    system = {"role": "system", "content": "你是助手。"}
    history = [system]
    for i in range(12):
        history += [{"role": "user", "content": f"第{i}个问题：" + "北京" * 8},
                    {"role": "assistant", "content": f"第{i}个回答：" + "上海" * 8}]
    history.append({"role": "user", "content": "最后的问题"})
    generation = engine.chat(history, SamplingParams(max_tokens=32))
    assert generation.dropped > 0 and generation.dropped % 2 == 0  # whole turns
    assert len(generation.prompt) + 32 <= engine.n_ctx
    text = engine.detokenize(generation.prompt)
    assert "你是助手。" in text and "最后的问题" in text and "第0个问题" not in text
    assert generation.stats.dropped_messages == generation.dropped
    generation.result()


def test_a_message_longer_than_the_context_is_refused(tiny_gguf: Path) -> None:
    from edgezh.runtime.engine import ContextOverflow

    engine = engine_for(tiny_gguf, n_ctx=256)
    with pytest.raises(ContextOverflow, match="context holds 256"):
        engine.chat([{"role": "user", "content": "长" * 600}], SamplingParams(max_tokens=16))


# --- UTF-8 safe decoding --------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture, model", [("tiny_gguf", "tiny_llama3"), ("smollm2_f16_gguf", "smollm2")])
def test_1000_chinese_tokens_decode_exactly_as_hf(fixture: str, model: str, request: pytest.FixtureRequest) -> None:
    """Token ids of People's Daily sentences (sampled at random), decoded piece by piece as the stream
    does, equal the HF tokenizer's decode — and no partial output ever holds U+FFFD."""
    engine = engine_for(request.getfixturevalue(fixture))
    tokenizer = hf_tokenizer(request.getfixturevalue(model))
    lines, rng, ids = chinese_lines(), random.Random(1998), []
    while len(ids) < 1000:
        ids += tokenizer(rng.choice(lines), add_special_tokens=False)["input_ids"]
    ids = ids[:1000]
    expected = tokenizer.decode(ids)
    cut = len(expected.rstrip("\ufffd"))  # the cut at 1000 may split the last character: HF shows U+FFFD there
    stream, shown, split = Utf8Stream(), [], 0
    for token in ids:
        delta = stream.feed(engine.pieces(token))
        assert "\ufffd" not in delta
        split += delta == ""
        shown.append(delta)
    text = "".join(shown) + stream.finish()
    assert split > 0  # some characters really were split across tokens
    assert text == expected[:cut] and "\ufffd" not in text
    assert engine.detokenize(ids) == text


def test_pieces_longer_than_32_bytes_are_kept(tiny_gguf: Path, tiny_llama3: Path) -> None:
    """llama-cpp-python's detokenize drops pieces over 32 bytes; the engine's pieces do not."""
    engine = engine_for(tiny_gguf)
    tokenizer = hf_tokenizer(tiny_llama3)
    long_ids = [i for i in range(20000) if len(tokenizer.decode([i]).encode()) > 32][:5]
    assert long_ids
    for token in long_ids:
        assert engine.detokenize([token]) == tokenizer.decode([token])
    # what llama-cpp-python's 32-byte buffer makes of it (the stream would have lost the piece)
    assert engine.model.detokenize(long_ids[:1]).decode("utf-8", "replace") != tokenizer.decode(long_ids[:1])


def test_streamed_generation_matches_hf_decode_of_its_tokens(tiny_gguf: Path, tiny_llama3: Path) -> None:
    """Random weights emit any token, lone bytes included: the streamed text is what HF decodes."""
    engine = engine_for(tiny_gguf)
    tokenizer = hf_tokenizer(tiny_llama3)
    generation = engine.chat(CHAT, SamplingParams(max_tokens=60, seed=11, temperature=1.5, min_p=0))
    text = generation.result()
    expected = tokenizer.decode(generation.tokens, skip_special_tokens=True)
    assert text == expected.rstrip("\ufffd") or text == expected


def test_utf8_stream_holds_a_split_character() -> None:
    data = "中文".encode()
    stream = Utf8Stream()
    assert stream.feed(data[:1]) == "" and stream.feed(data[1:4]) == "中" and stream.feed(data[4:]) == "文"
    assert stream.feed(b"\xe4") == "" and stream.finish() == ""  # cut mid-character: dropped, never U+FFFD


def test_stop_strings_hold_back_a_possible_start() -> None:
    stops = StopStrings(["Observation:"])
    assert stops.feed("Action: calc\nObs") == "Action: calc\n"
    assert stops.feed("erva") == "" and stops.hit is None
    assert stops.feed("tion: 42") == "" and stops.hit == "Observation:"
    other = StopStrings(["STOP"])
    assert other.feed("ST") == "" and other.feed("AY") == "STAY" and other.flush() == ""


# --- build folders --------------------------------------------------------------------------------------

def test_build_dir_picks_q4_k_m_template_and_defaults(tiny_build: Path) -> None:
    source = resolve(tiny_build)
    assert source.kind == "q4_k_m" and source.path.name == "tiny-llama3-q4_k_m.gguf" and source.path.is_file()
    assert source.template == "llama3" and source.system is None
    assert source.defaults == {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1, "n_ctx": 2048}
    assert resolve(tiny_build, "q8_0").path.name == "tiny-llama3-q8_0.gguf"
    assert resolve(tiny_build, "f16").path.name == "tiny-llama3-f16.gguf"
    with pytest.raises(UserError, match="no q5_k_m GGUF in this build"):
        resolve(tiny_build, "q5_k_m")
    engine = Engine.load(source.path, template=source.template, n_ctx=256, n_threads=2)
    assert engine.chat(CHAT, SamplingParams(max_tokens=4)).result() is not None


def test_build_dir_system_prompt_comes_from_the_modelfile_stage(tiny_build: Path, tmp_path: Path) -> None:
    import json

    copy = tmp_path / "build"
    shutil.copytree(tiny_build, copy, ignore=shutil.ignore_patterns("*.gguf"))
    manifest = json.loads((copy / "manifest.json").read_text())
    folder = copy / manifest["stages"]["modelfile"]["folder"] / "manifest.json"
    stage = json.loads(folder.read_text())
    stage["config"]["system"] = "你是 edgezh 的测试助手。"
    folder.write_text(json.dumps(stage, ensure_ascii=False))
    quant = copy / manifest["stages"]["quantize"]["folder"]
    (quant / "tiny-llama3-q4_k_m.gguf").symlink_to(tiny_build / "export" / "tiny-llama3-q4_k_m.gguf")
    source = resolve(copy)
    assert source.system == "你是 edgezh 的测试助手。" and source.path.resolve().is_file()


def test_not_a_build_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not an edgezh build"):
        resolve(tmp_path)
    with pytest.raises(UserError, match="no such file or build folder"):
        resolve(tmp_path / "missing")
