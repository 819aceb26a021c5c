"""The HSK builtins, built offline from `edgezh.data.corpora.hsk_sentences()` (CC-BY-SA-4.0).

- ``hsk-chat``: Chinese chat tasks, one conversation per sentence and task: zh→en translation, en→zh
  translation, explain a word (in Chinese), explain a sentence (in Chinese), use a word in a sentence.
  Answers are in the language asked for; every conversation starts with the chat format's default
  Chinese system prompt.
- ``hsk-dpo``: language-preference pairs: a Chinese prompt, ``chosen`` answers in Chinese, ``rejected``
  says the same in English (use a word in a sentence, give an HSK-level example, name the words of a
  sentence).

Phrasings are drawn from several templates per task with a seeded RNG: the same seed gives the same data.
"""

from __future__ import annotations

import random
import re
from typing import Callable

from edgezh.data.conversation import Conversation, Pair
from edgezh.data.corpora import hsk_sentences

_HAN = re.compile(r"[\u3400-\u9fff]")
_BAD_GLOSS = re.compile(r"^(see |used in |variant of |old variant|surname |CL:|abbr\. for|erhua variant)|[|\[]")

ZH_EN = (["请把这句话翻译成英文：{zh}", "“{zh}”用英语怎么说？", "把下面的中文句子翻译成英语。\n{zh}", "这句中文的英文意思是什么？{zh}"],
         ["{en}", "英文是：{en}", "可以翻译成：{en}"])
EN_ZH = (["请把这句英文翻译成中文：{en}", "“{en}”用中文怎么说？", "请翻译成中文：{en}", "把下面的句子翻译成中文。\n{en}"],
         ["{zh}", "中文是：{zh}", "可以说：{zh}"])
EXPLAIN_WORD = (["“{w}”是什么意思？", "请用中文解释一下“{w}”这个词。", "“{w}”怎么读？是什么意思？", "我不懂“{w}”这个词，能解释一下吗？"],
                ["“{w}”读作 {wpy}，意思是“{gloss}”。例如：{zh}（{en}）", "“{w}”的拼音是 {wpy}，英文意思是“{gloss}”。例句：{zh}",
                 "“{w}”（{wpy}）表示“{gloss}”。比如：{zh}"])
EXPLAIN_SENTENCE = (["请解释这句话：{zh}", "“{zh}”这句话是什么意思？", "帮我分析一下这个句子：{zh}"],
                    ["这句话的意思是：{en}\n拼音：{py}\n{words}\n这是一个HSK{level}级的句子。",
                     "意思是“{en}”。\n拼音：{py}\n{words}"])
USE_WORD = (["请用“{w}”造一个句子。", "用“{w}”这个词说一句话。", "“{w}”这个词怎么用？请举一个例子。"],
            ["{zh}", "例如：{zh}", "可以这样说：{zh}（{py}）"])
DPO_USE_WORD = (["请用“{w}”造一个句子。", "用“{w}”这个词说一句话。", "“{w}”这个词怎么用？请举一个例子。"],
                [("例如：{zh}", "For example: {en}"), ("{zh}", "{en}"), ("可以这样说：{zh}", "You could say: {en}")])
DPO_EXAMPLE = (["请给我一个HSK{level}级的中文例句。", "能说一个HSK{level}级的句子吗？", "来一个HSK{level}级的例句吧。"],
               [("{zh}", "{en}"), ("好的：{zh}", "Sure: {en}")])
DPO_WORDS = (["“{zh}”这句话里有哪些词？", "请列出这句话里的词语：{zh}"],
             [("这句话里的词有：{zh_words}。", "The words in this sentence are: {en_words}.")])


def han_share(text: str) -> float:
    """Share of Han characters among the letters (Han + Latin) of ``text``."""
    han = len(_HAN.findall(text))
    latin = sum(c.isascii() and c.isalpha() for c in text)
    return han / (han + latin) if han + latin else 0.0


def gloss(text: str) -> str | None:
    """The first usable English sense of a CC-CEDICT gloss, or None."""
    for sense in (s.strip() for s in text.split(";")):
        if sense and not _BAD_GLOSS.search(sense) and len(sense) <= 60:
            return sense
    return None


def _words(sentence: dict) -> list[dict]:
    """The sentence's Chinese words that have a usable gloss."""
    words = []
    for token in sentence.get("tokens") or []:
        meaning = gloss(token.get("gloss_en") or "")
        if meaning and _HAN.search(token.get("word", "")) and token.get("pinyin"):
            words.append({"w": token["word"], "wpy": token["pinyin"], "gloss": meaning})
    return words


def _fields(sentence: dict) -> dict:
    return {"zh": sentence["chinese"].strip(), "en": sentence["translation"]["en"].strip(),
            "py": sentence["pinyin"].strip(), "level": sentence["hsk_level"]}


def _usable(sentence: dict) -> bool:
    return bool(sentence.get("chinese") and (sentence.get("translation") or {}).get("en") and sentence.get("pinyin"))


def chat(system: str, seed: int) -> list[Conversation]:
    """``hsk-chat``: every sentence in every task that it supports."""
    rng = random.Random(f"hsk-chat:{seed}")
    result = []
    for sentence in hsk_sentences():
        if not _usable(sentence):
            continue
        values = _fields(sentence)
        words = _words(sentence)
        values["words"] = "\n".join(f"- {w['w']}（{w['wpy']}）：{w['gloss']}" for w in words) or "（无词语注释）"
        tasks: list[tuple[str, tuple, dict]] = [("zh_en", ZH_EN, values), ("en_zh", EN_ZH, values),
                                                ("explain_sentence", EXPLAIN_SENTENCE, values)]
        if words:
            word = words[rng.randrange(len(words))]
            tasks += [("explain_word", EXPLAIN_WORD, {**values, **word}), ("use_word", USE_WORD, {**values, **word})]
        for task, (prompts, answers), fields in tasks:
            user = rng.choice(prompts).format(**fields)
            assistant = rng.choice(answers).format(**fields)
            result.append(Conversation([{"role": "system", "content": system}, {"role": "user", "content": user},
                                        {"role": "assistant", "content": assistant}],
                                       origin=f"builtin hsk-chat {sentence['id']} {task}"))
    return result


def dpo(system: str, seed: int) -> list[Pair]:
    """``hsk-dpo``: Chinese prompt; chosen in Chinese, rejected the same content in English."""
    rng = random.Random(f"hsk-dpo:{seed}")
    result = []
    for sentence in hsk_sentences():
        if not _usable(sentence):
            continue
        values = _fields(sentence)
        words = _words(sentence)
        tasks: list[tuple[str, tuple, dict]] = [("example", DPO_EXAMPLE, values)]
        if words:
            tasks.append(("use_word", DPO_USE_WORD, {**values, **words[rng.randrange(len(words))]}))
        if len(words) >= 2:
            tasks.append(("words", DPO_WORDS, {**values, "zh_words": "、".join(w["w"] for w in words),
                                               "en_words": ", ".join(w["gloss"] for w in words)}))
        for task, (prompts, answers), fields in tasks:
            prompt = rng.choice(prompts).format(**fields)
            chosen, rejected = (t.format(**fields) for t in rng.choice(answers))
            if han_share(rejected) > 0.2 or han_share(chosen) < 0.8:
                continue  # an English "translation" that is mostly Chinese, or the reverse: no clear preference
            result.append(Pair([{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                               [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}],
                               origin=f"builtin hsk-dpo {sentence['id']} {task}"))
    return result


BUILDERS: dict[str, Callable] = {"hsk-chat": chat, "hsk-dpo": dpo}


def build(name: str, system: str, seed: int) -> list:
    return BUILDERS[name](system, seed)
