"""The HSK builtins: deterministic, varied, Chinese prompts; DPO pairs prefer Chinese over the same content in English."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from edgezh import templates
from edgezh.data import builtin_hsk
from edgezh.data.builtin_hsk import han_share
from edgezh.pipeline import make_plan, run_plan
from edgezh.recipe_load import load_recipe

SYSTEM = templates.get("chatml").default_system


@pytest.fixture(scope="module")
def chat(hsk_sentences):
    return builtin_hsk.chat(SYSTEM, 42)


@pytest.fixture(scope="module")
def pairs(hsk_sentences):
    return builtin_hsk.dpo(SYSTEM, 42)


def task(record) -> str:
    return record.origin.rsplit(" ", 1)[1]


def test_chat_is_deterministic_and_seeded(chat) -> None:
    again = builtin_hsk.chat(SYSTEM, 42)
    assert [c.messages for c in again] == [c.messages for c in chat]
    other = builtin_hsk.chat(SYSTEM, 7)
    assert len(other) == len(chat)
    changed = sum(a.messages != b.messages for a, b in zip(chat, other))
    assert changed > len(chat) // 3  # another seed draws other phrasings


def test_chat_covers_every_task_with_varied_chinese_prompts(chat, hsk_sentences) -> None:
    tasks = Counter(task(c) for c in chat)
    assert set(tasks) == {"zh_en", "en_zh", "explain_word", "explain_sentence", "use_word"}
    assert tasks["zh_en"] == tasks["en_zh"] == len(hsk_sentences)
    for conversation in chat:
        system, question, answer = conversation.messages
        assert system == {"role": "system", "content": SYSTEM}
        assert question["role"] == "user" and answer["role"] == "assistant"
        assert han_share(question["content"]) > 0
    # several phrasings per task: the prompt with the sentence/word removed takes at least 3 shapes
    by_sentence = {s["id"]: s for s in hsk_sentences}
    shapes = Counter()
    for conversation in chat:
        if task(conversation) == "zh_en":
            sentence = by_sentence[conversation.origin.split()[2]]
            shapes[conversation.messages[1]["content"].replace(sentence["chinese"].strip(), "<S>")] += 1
    assert len(shapes) >= 3 and all(n > 100 for n in shapes.values())


def test_chat_answers_in_the_language_asked(chat, hsk_sentences) -> None:
    by_sentence = {s["id"]: s for s in hsk_sentences}
    for conversation in chat:
        sentence = by_sentence[conversation.origin.split()[2]]
        question, answer = conversation.messages[1]["content"], conversation.messages[2]["content"]
        kind = task(conversation)
        if kind == "zh_en":
            assert sentence["translation"]["en"].strip() in answer and sentence["chinese"].strip() in question
        elif kind == "en_zh":
            assert sentence["chinese"].strip() in answer and sentence["translation"]["en"].strip() in question
            assert han_share(answer) == 1.0 or "（" in answer  # Chinese, pinyin at most
        elif kind in ("explain_word", "explain_sentence"):
            assert any(word in answer for word in ("读作", "拼音", "意思", "表示"))
        else:
            assert sentence["chinese"].strip() in answer


def test_chinese_share_of_prompts(chat, pairs, hsk_sentences) -> None:
    prompts = [c.messages[1]["content"] for c in chat if task(c) in ("zh_en", "explain_word", "explain_sentence", "use_word")]
    assert min(han_share(p) for p in prompts) > 0.5
    # en→zh prompts quote an English sentence; the request around it is Chinese
    english = {s["id"]: s["translation"]["en"].strip() for s in hsk_sentences}
    requests = [c.messages[1]["content"].replace(english[c.origin.split()[2]], "") for c in chat if task(c) == "en_zh"]
    assert all(han_share(r) == 1.0 for r in requests)
    assert min(han_share(p.prompt[-1]["content"]) for p in pairs) > 0.5


def test_dpo_prefers_chinese_over_the_same_content_in_english(pairs, hsk_sentences) -> None:
    assert len(pairs) > 2 * len(hsk_sentences)
    assert set(Counter(task(p) for p in pairs)) == {"example", "use_word", "words"}
    by_sentence = {s["id"]: s for s in hsk_sentences}
    for pair in pairs:
        assert pair.prompt[0] == {"role": "system", "content": SYSTEM} and pair.prompt[1]["role"] == "user"
        chosen, rejected = pair.chosen[0]["content"], pair.rejected[0]["content"]
        assert han_share(chosen) >= 0.8 and han_share(rejected) <= 0.2 and chosen != rejected
        sentence = by_sentence[pair.origin.split()[2]]
        if task(pair) in ("example", "use_word"):  # the same sentence, in each language
            assert sentence["chinese"].strip() in chosen and sentence["translation"]["en"].strip() in rejected
    mean_chosen = sum(han_share(p.chosen[0]["content"]) for p in pairs) / len(pairs)
    mean_rejected = sum(han_share(p.rejected[0]["content"]) for p in pairs) / len(pairs)
    assert mean_chosen > 0.95 and mean_rejected < 0.05
    assert [p.key() for p in builtin_hsk.dpo(SYSTEM, 42)] == [p.key() for p in pairs]


def test_builtins_through_the_stage(tiny_llama3: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: hsk
base: {{path: {tiny_llama3}, template: llama3}}
data:
  sources: [{{builtin: hsk-chat, samples: 40}}, {{builtin: hsk-dpo, samples: 20}}]
  eval_ratio: 0.1
""", encoding="utf-8")
    plan = make_plan(load_recipe(recipe, [f"output.root={tmp_path / 'b'}"]), until="data")
    run_plan(plan)
    artifact = plan.step("data").artifact
    train = [json.loads(x) for x in artifact.file("train.jsonl").read_text(encoding="utf-8").splitlines()]
    pairs = [json.loads(x) for x in artifact.file("pairs_train.jsonl").read_text(encoding="utf-8").splitlines()]
    held = artifact.file("eval.jsonl").read_text(encoding="utf-8").splitlines()
    held_pairs = artifact.file("pairs_eval.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(train) + len(held) == 40 and len(pairs) + len(held_pairs) == 20 and held and held_pairs
    assert all(r["messages"][0]["content"] == templates.get("llama3").default_system and r["source"] == "hsk-chat" for r in train)
    assert all(han_share(p["chosen"][0]["content"]) > han_share(p["rejected"][0]["content"]) for p in pairs)
    assert artifact.info["sources"]["hsk-chat"]["format"] == "messages" and artifact.info["sources"]["hsk-dpo"]["kind"] == "pairs"
