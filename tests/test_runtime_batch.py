"""Continuous batching in one llama.cpp context (`edgezh.runtime.batch`), on real GGUFs: answers given
next to other requests are the answers given alone; requests join and leave between steps; prefix
reuse; waiting and cancelling; per-sequence samplers and log-probabilities."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from edgezh.runtime.engine import Engine, Generation, SamplingParams
from test_runtime_fixtures import engine_for, smollm2_f16_gguf, smollm2_q4_gguf, tiny_gguf  # noqa: F401

QUESTIONS = ["请介绍一下北京。", "Write a short story about a cat.", "什么是机器学习？", "List five fruits.",
             "请写一首关于春天的诗。", "How does a rainbow form?"]
GREEDY = SamplingParams(max_tokens=48, temperature=0)


def ask(engine: Engine, question: str, params: SamplingParams = GREEDY) -> Generation:
    return engine.chat([{"role": "user", "content": question}], params)


def test_parallel_greedy_answers_are_the_answers_alone(smollm2_q4_gguf: Path) -> None:
    """q4_k_m on the CPU, 4 sequences, requests joining while others decode (prompts fed beside decode
    rows) and in different slots: every answer is token for token the one it gets alone."""
    engine = engine_for(smollm2_q4_gguf, parallel=4, n_ctx=512)
    alone = {q: ask(engine, q).result() for q in QUESTIONS}
    assert len(set(alone.values())) == len(QUESTIONS)
    for first in range(0, len(QUESTIONS), 2):
        group = (QUESTIONS + QUESTIONS)[first:first + 4]
        generations = []
        for index, question in enumerate(group):
            generations.append(ask(engine, question).start())
            time.sleep(0.03 * index)  # join at different steps
        for generation in generations:
            assert generation.wait(120)
        assert [g.text for g in generations] == [alone[q] for q in group]
    assert engine.loop.steps > 0 and engine.loop.state()["running"] == 0


def test_several_sequences_really_decode_together(smollm2_f16_gguf: Path) -> None:
    """Four generations of 40 tokens take about 40 decode steps together, not 160 one after another."""
    engine = engine_for(smollm2_f16_gguf, parallel=4, n_ctx=512)
    before = engine.loop.steps
    generations = [ask(engine, q, SamplingParams(max_tokens=40, temperature=0, min_p=0)) for q in QUESTIONS[:4]]
    for generation in generations:
        generation.start()
    for generation in generations:
        generation.wait(120)
    tokens = sum(len(g.tokens) for g in generations)
    assert tokens > 100 and engine.loop.steps - before < tokens // 2


def test_new_requests_keep_the_busy_slots_one_consecutive_run(tiny_gguf: Path) -> None:
    """llama.cpp computes decode rows of non-consecutive seq_ids as separate graphs, so a request that
    joins takes the free slot next to the busy ones: with slots 0, 1, 2 busy and 1 ending, the next
    request takes 1 (least recently used would have been 3), and the rows stay one run."""
    from edgezh.runtime.batch import runs

    assert runs({0, 1, 2}) == 1 and runs({0, 2, 3}) == 2 and runs({1, 3}) == 2 and runs(set()) == 0
    engine = engine_for(tiny_gguf, parallel=4, n_ctx=256)
    loop = engine.loop
    for question in QUESTIONS[:4]:  # every slot used once, 0 first: least recently used is 0, 1, 2, 3
        ask(engine, question, SamplingParams(max_tokens=2, temperature=0)).result()
    long = SamplingParams(max_tokens=200, temperature=0, min_p=0, repeat_penalty=1.0)
    first, short, third = (ask(engine, q, p).start() for q, p in
                           zip(QUESTIONS, (long, SamplingParams(max_tokens=3, temperature=0), long)))
    assert short.wait(60) and not first.done.is_set() and not third.done.is_set()
    joining = ask(engine, QUESTIONS[3], long).start()
    busy = set()
    deadline = time.monotonic() + 30
    while len(busy) < 3 and time.monotonic() < deadline:
        busy = {slot.seq_id for slot in loop.slots if slot.job is not None}
        time.sleep(0.001)
    for generation in (first, third, joining):
        generation.cancel.set()
    loop.wake()
    assert busy == {0, 1, 2} and runs(busy) == 1


def test_multi_turn_reuses_the_cached_prefix(tiny_gguf: Path) -> None:
    engine = engine_for(tiny_gguf)
    chat = [{"role": "user", "content": "你好"}]
    first = engine.chat(chat, SamplingParams(max_tokens=8, seed=1))
    first.result()
    chat += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "再说一遍"}]
    second = engine.chat(chat, SamplingParams(max_tokens=8, seed=1))
    second.result()
    assert first.stats.cached_tokens == 0 or first.stats.cached_tokens < len(first.prompt)
    assert second.stats.cached_tokens >= len(first.prompt) - 1


def test_with_several_slots_only_whole_prompt_chunks_are_reused(smollm2_f16_gguf: Path) -> None:
    from edgezh.runtime.batch import PROMPT_CHUNK

    engine = engine_for(smollm2_f16_gguf, parallel=2, n_ctx=1024)
    long = [{"role": "user", "content": "北京是中国的首都。" * 60}]
    params = SamplingParams(max_tokens=4, temperature=0)
    first = engine.chat(long, params)
    first.result()
    assert len(first.prompt) > PROMPT_CHUNK
    again = engine.chat(long, params)
    again.result()
    assert again.stats.cached_tokens == (len(first.prompt) - 1) // PROMPT_CHUNK * PROMPT_CHUNK
    assert again.text == first.text


def test_requests_past_the_slots_wait_and_a_cancelled_one_never_runs(tiny_gguf: Path) -> None:
    engine = engine_for(tiny_gguf)  # one slot
    running = ask(engine, "写一篇长文章", SamplingParams(max_tokens=300, seed=1, temperature=1.0)).start()
    cancel = threading.Event()
    waiting = engine.chat([{"role": "user", "content": "你好"}], SamplingParams(max_tokens=8), cancel=cancel).start()
    time.sleep(0.1)
    assert not waiting.done.is_set() and engine.loop.state()["waiting"] == 1
    cancel.set()
    engine.loop.wake()
    assert waiting.wait(10) and waiting.finish_reason == "cancelled" and waiting.tokens == []
    assert running.wait(120) and running.finish_reason in ("stop", "length") and running.tokens


def test_leaving_an_iteration_early_cancels_and_frees_the_slot(tiny_gguf: Path) -> None:
    engine = engine_for(tiny_gguf)
    generation = ask(engine, "写一篇长文章", SamplingParams(max_tokens=2000, seed=2, temperature=1.0))
    for index, _ in enumerate(generation):
        if index == 3:
            break
    assert generation.wait(10) and generation.finish_reason == "cancelled" and len(generation.tokens) < 100
    assert ask(engine, "你好", SamplingParams(max_tokens=3)).result() is not None


def test_seeds_are_per_sequence(tiny_gguf: Path) -> None:
    """Sampled (temperature 1) sequences decoding together keep their own seeds."""
    engine = engine_for(tiny_gguf, parallel=3)
    params = [SamplingParams(max_tokens=16, temperature=1.0, min_p=0, seed=seed) for seed in (1, 2, 1)]
    alone = [ask(engine, "你好", p).result() for p in params]
    together = [ask(engine, "你好", p).start() for p in params]
    for generation in together:
        generation.wait(60)
    assert [g.text for g in together] == alone and alone[0] == alone[2] and alone[0] != alone[1]


def test_logprobs_are_the_models_distribution(smollm2_f16_gguf: Path) -> None:
    engine = engine_for(smollm2_f16_gguf)
    generation = ask(engine, "What is the capital of France?", SamplingParams(max_tokens=12, temperature=0, logprobs=3))
    generation.result()
    assert len(generation.logprobs) == len(generation.tokens)
    for token, entry in zip(generation.tokens, generation.logprobs):
        assert entry["token"] == token and entry["logprob"] <= 0
        top = entry["top"]
        assert len(top) == 3 and top[0][0] == token  # greedy: the chosen token is the most likely
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        assert abs(top[0][1] - entry["logprob"]) < 1e-6


def test_closing_the_engine_ends_its_generations(tiny_gguf: Path) -> None:
    engine = Engine.load(tiny_gguf, n_threads=2, parallel=2)
    generation = ask(engine, "写一篇长文章", SamplingParams(max_tokens=3000, temperature=1.0)).start()
    time.sleep(0.2)
    engine.close()
    assert generation.done.is_set() and generation.finish_reason == "cancelled"
    with pytest.raises(RuntimeError, match="closed"):
        ask(engine, "你好").start()


@pytest.mark.parametrize("repeat, frequency, presence", [(1.1, 0.0, 0.0), (1.3, 0.2, 0.5), (1.0, 0.0, 0.0)])
def test_penalties_change_the_logits_exactly_as_llama_cpp_does(repeat: float, frequency: float, presence: float) -> None:
    """`Penalties` (numpy, in place) against llama.cpp's own penalties sampler on the same history:
    bit-identical logits after each of 150 accepted tokens (the 64-token window rolls over), with
    negative and positive logits among the penalised ones."""
    import ctypes

    import llama_cpp
    import numpy as np

    from edgezh.runtime.batch import PENALTY_LAST_N, Penalties

    n_vocab, rng = 5000, np.random.default_rng(7)
    params = SamplingParams(repeat_penalty=repeat, frequency_penalty=frequency, presence_penalty=presence)
    ours = Penalties(params)
    theirs = llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, repeat, frequency, presence)
    data = (llama_cpp.llama_token_data * n_vocab)()
    view = np.frombuffer(data, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
    try:
        for step in range(150):
            logits = rng.normal(0, 4, n_vocab).astype(np.float32)
            view["id"], view["logit"], view["p"] = np.arange(n_vocab), logits, 0.0
            llama_cpp.llama_sampler_apply(theirs, ctypes.byref(llama_cpp.llama_token_data_array(data, n_vocab, -1, False)))
            mine = logits.copy()
            ours.apply(mine)
            assert np.array_equal(mine, view["logit"]), f"step {step}"
            if step and (repeat, frequency, presence) != (1.0, 0.0, 0.0):
                assert not np.array_equal(mine, logits)  # something was penalised
            token = int(rng.integers(0, 40))  # few distinct tokens: counts above 1
            ours.accept(token)
            llama_cpp.llama_sampler_accept(theirs, token)
    finally:
        llama_cpp.llama_sampler_free(theirs)
