"""The eval measurements on real engines: windows, perplexity parity, KL divergence, multiple choice,
Chinese replies, and the variants of a build (LoRA adapter, GPTQ)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from edgezh.errors import UserError
from edgezh.eval import chinese_reply, kld, multiple_choice, perplexity
from edgezh.eval.backends import GGUFBackend, HFBackend
from edgezh.eval.tokens import EvalTokenizer

THREADS = 1  # llama.cpp spin-waits between threads: on a shared 2-core machine one thread is faster


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ggufs(tmp_path_factory, tiny_llama3: Path, smollm2: Path) -> dict[str, Path]:
    """Tiny Llama 3 as F32 and F16; SmolLM2 as F16, q8_0 and q4_k_m (llama.cpp's own quantizer)."""
    from edgezh.export.gguf_writer import convert
    from edgezh.export.quantize import quantize

    folder = tmp_path_factory.mktemp("eval-gguf")
    files = {"tiny-f32": folder / "tiny-f32.gguf", "tiny-f16": folder / "tiny-f16.gguf", "smol-f16": folder / "smol-f16.gguf"}
    convert(tiny_llama3, files["tiny-f32"], "f32", template="llama3")
    convert(tiny_llama3, files["tiny-f16"], "f16", template="llama3")
    convert(smollm2, files["smol-f16"], "f16", template="chatml")
    for kind in ("q8_0", "q4_k_m"):
        files[f"smol-{kind}"] = folder / f"smol-{kind}.gguf"
        quantize(files["smol-f16"], files[f"smol-{kind}"], kind, threads=2)
    return files


@pytest.fixture(scope="module")
def tiny_tok(tiny_llama3: Path) -> EvalTokenizer:
    return EvalTokenizer(tiny_llama3, "llama3")


@pytest.fixture(scope="module")
def tiny_hf(tiny_llama3: Path):
    backend = HFBackend.load(tiny_llama3, name="base")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def chinese_text(hsk_sentences, peoples_daily) -> str:
    return peoples_daily[:300] + "\n" + "\n".join(s["chinese"] for s in hsk_sentences[1000:1040])


# --- windows --------------------------------------------------------------------------------------


def test_windows_score_every_token_once_with_bos() -> None:
    wins = perplexity.windows(list(range(10)), context_length=5, stride=2, bos_id=99)
    assert [w.ids for w in wins] == [[99, 0, 1, 2, 3], [99, 2, 3, 4, 5], [99, 4, 5, 6, 7], [99, 6, 7, 8, 9]]
    assert [w.targets for w in wins] == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    assert [w.rows for w in wins] == [[0, 1, 2, 3], [2, 3], [2, 3], [2, 3]]


def test_windows_without_bos_leave_the_first_token_as_context() -> None:
    wins = perplexity.windows(list(range(10)), context_length=5, stride=2, bos_id=None)
    assert [w.targets for w in wins] == [[1, 2, 3, 4], [5, 6], [7, 8], [9]]
    assert [w.ids[0] for w in wins] == [0, 2, 4, 6]


@pytest.mark.parametrize("bos", [None, 128000])
def test_each_row_predicts_the_token_after_it(bos) -> None:
    tokens = list(range(1000, 1437))
    wins = perplexity.windows(tokens, context_length=64, stride=24, bos_id=bos)
    scored = [t for w in wins for t in w.targets]
    assert scored == tokens[(0 if bos else 1):]  # every token once, in order
    for w in wins:
        assert len(w.ids) <= 64 and all(w.ids[r + 1] == t for r, t in zip(w.rows, w.targets))
        if w is not wins[0]:
            assert min(w.rows) >= 64 - (1 if bos else 0) - 24 - 1  # at least L - stride tokens of context


# --- perplexity and KL divergence on real engines ---------------------------------------------------


def test_f32_gguf_perplexity_equals_transformers(ggufs, tiny_tok, tiny_hf, chinese_text) -> None:
    ids = tiny_tok.encode(chinese_text)[:400]
    wins = perplexity.windows(ids, context_length=128, stride=64, bos_id=tiny_tok.bos_id)
    assert sum(len(w) for w in wins) == 400 and len(wins) == 6
    hf = perplexity.perplexity(perplexity.score(tiny_hf, wins))
    with GGUFBackend(ggufs["tiny-f32"], n_ctx=128, threads=THREADS) as llm:
        cpp = perplexity.perplexity(perplexity.score(llm, wins))
    # Measured: 133502.0815 vs 133502.0825, 7e-9 relative (random tiny model).
    assert hf > 1000 and abs(cpp / hf - 1) < 1e-3, (hf, cpp)


def test_gguf_greedy_matches_transformers(ggufs, tiny_tok, tiny_hf, chinese_text) -> None:
    prompt = tiny_tok.with_bos(tiny_tok.encode(chinese_text)[:20])
    with GGUFBackend(ggufs["tiny-f32"], n_ctx=64, threads=THREADS) as llm:
        ours = llm.greedy(prompt, 10, tiny_tok.stop_ids)
    assert len(ours) == 10 and ours == tiny_hf.greedy(prompt, 10, tiny_tok.stop_ids)


def test_kld_of_a_model_against_itself_is_zero(ggufs, tiny_tok, chinese_text) -> None:
    ids = tiny_tok.encode(chinese_text)[:200]
    wins = perplexity.windows(ids, context_length=96, stride=48, bos_id=tiny_tok.bos_id)
    with GGUFBackend(ggufs["tiny-f16"], n_ctx=96, threads=THREADS) as a, \
            GGUFBackend(ggufs["tiny-f16"], n_ctx=96, threads=THREADS) as b:
        ref_nll, comps = kld.compare(a, {"same": b}, wins)
    nll, values, top1 = comps["same"].arrays()
    s = kld.stats(values, top1)
    assert s["tokens"] == 200 and s["mean"] == 0.0 and s["max"] == 0.0 and s["top1"] == 1.0
    assert np.array_equal(nll, ref_nll)


@pytest.mark.slow
def test_q8_0_is_closer_to_f16_than_q4_k_m_on_smollm2(ggufs, smollm2, chinese_text) -> None:
    tok = EvalTokenizer(smollm2, "chatml")
    ids = tok.encode(chinese_text)[:256]
    wins = perplexity.windows(ids, context_length=128, stride=64, bos_id=tok.bos_id)
    assert tok.bos_id is None and sum(len(w) for w in wins) == 255  # ChatML: no BOS, the first token is context
    with GGUFBackend(ggufs["smol-f16"], n_ctx=128, threads=THREADS) as ref, \
            GGUFBackend(ggufs["smol-q8_0"], n_ctx=128, threads=THREADS) as q8, \
            GGUFBackend(ggufs["smol-q4_k_m"], n_ctx=128, threads=THREADS) as q4:
        assert ref.n_vocab == q8.n_vocab == q4.n_vocab == 49152
        ref_nll, comps = kld.compare(ref, {"q8_0": q8, "q4_k_m": q4}, wins)
    s8, s4 = (kld.stats(*comps[k].arrays()[1:]) for k in ("q8_0", "q4_k_m"))
    # Measured: q8_0 mean KLD 0.0077, p99 0.066, top-1 96.5%; q4_k_m 0.089, 0.50, 84.7% (F16 perplexity 13.9).
    assert 0 < s8["mean"] < s4["mean"] / 3 and s8["p99"] < s4["p99"]
    assert s8["top1"] > s4["top1"] and s8["top1"] > 0.9
    ppl = {k: perplexity.perplexity(comps[k].arrays()[0]) for k in comps}
    ref_ppl = perplexity.perplexity(ref_nll)
    assert abs(ppl["q8_0"] / ref_ppl - 1) < abs(ppl["q4_k_m"] / ref_ppl - 1)


# --- multiple choice ----------------------------------------------------------------------------------

CEVAL_HEADER = ["id", "question", "A", "B", "C", "D", "answer"]
CMMLU_HEADER = ["", "Question", "A", "B", "C", "D", "Answer"]


def _questions(n: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = np.random.default_rng(seed)
    words = ["计算机", "网络", "协议", "数据", "法律", "数学", "函数", "农业", "土壤", "历史", "文化", "经济"]
    return [(f"下列关于{''.join(rng.choice(words, 2))}的说法，正确的是____。", [f"{''.join(rng.choice(words, 2))}{k}" for k in range(4)])
            for _ in range(n)]


def _write(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([header] + rows)


def _ceval_folder(root: Path, answers: dict[str, list[str]]) -> Path:
    """C-Eval layout: dev/<s>_dev.csv (with explanation), val/<s>_val.csv, test/<s>_test.csv (no answers)."""
    for n, (subject, letters) in enumerate(answers.items()):
        qs = _questions(len(letters), seed=n)
        _write(root / "val" / f"{subject}_val.csv", CEVAL_HEADER, [[i, q, *o, a] for i, ((q, o), a) in enumerate(zip(qs, letters))])
        dev = _questions(5, seed=100 + n)
        _write(root / "dev" / f"{subject}_dev.csv", CEVAL_HEADER + ["explanation"],
               [[i, q, *o, "ABCD"[i % 4], "因为……"] for i, (q, o) in enumerate(dev)])
        _write(root / "test" / f"{subject}_test.csv", CEVAL_HEADER[:-1], [[i, q, *o] for i, (q, o) in enumerate(qs)])
    return root


def _cmmlu_folder(root: Path, answers: dict[str, list[str]]) -> Path:
    """CMMLU layout: dev/<s>.csv and test/<s>.csv with an unnamed index column."""
    for n, (subject, letters) in enumerate(answers.items()):
        qs = _questions(len(letters), seed=10 + n)
        _write(root / "test" / f"{subject}.csv", CMMLU_HEADER, [[i, q, *o, a] for i, ((q, o), a) in enumerate(zip(qs, letters))])
        dev = _questions(5, seed=200 + n)
        _write(root / "dev" / f"{subject}.csv", CMMLU_HEADER, [[i, q, *o, "DCBA"[i % 4]] for i, (q, o) in enumerate(dev)])
    return root


def _preferred_letter(model, tok, text: str) -> str:
    """The letter transformers itself ranks first after `text` (computed here, not by edgezh.eval)."""
    import torch

    ids = [tok.bos_id] + tok.hf.encode(text, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    letters = [tok.hf.encode(x, add_special_tokens=False)[0] for x in "ABCD"]
    return "ABCD"[int(torch.argmax(logits[letters]))]


def _expected_answers(model, tok, layout: str, subjects: dict[str, tuple[int, int]], build, root: Path, shots: int) -> dict:
    """Write a folder whose first `right` answers per subject are the model's own choice and the rest
    another letter; return the folder. Prompts are spelled out here, after the official scripts."""
    folder = build(root / "probe", {s: ["A"] * n for s, (n, _) in subjects.items()})
    answers = {}
    for subject, (n, right) in subjects.items():
        if layout == "ceval":
            rows = list(csv.DictReader(open(folder / "val" / f"{subject}_val.csv", encoding="utf-8")))
            dev = list(csv.DictReader(open(folder / "dev" / f"{subject}_dev.csv", encoding="utf-8")))
            from edgezh.eval.categories import CEVAL
            head = f"以下是中国关于{CEVAL[subject][0]}考试的单项选择题，请选出其中的正确答案。\n\n"
            fmt = lambda r: f"{r['question']}\nA. {r['A']}\nB. {r['B']}\nC. {r['C']}\nD. {r['D']}\n答案："  # noqa: E731
            shots_text = "".join(fmt(r) + r["answer"] + "\n\n" for r in dev[:shots])
        else:
            rows = list(csv.DictReader(open(folder / "test" / f"{subject}.csv", encoding="utf-8")))
            dev = list(csv.DictReader(open(folder / "dev" / f"{subject}.csv", encoding="utf-8")))
            from edgezh.eval.categories import CMMLU
            head = f"以下是关于{CMMLU[subject][0]}的单项选择题，请直接给出正确答案的选项。\n\n"
            fmt = lambda r: f"题目：{r['Question']}\nA. {r['A']}\nB. {r['B']}\nC. {r['C']}\nD. {r['D']}\n答案是："  # noqa: E731
            shots_text = "".join(fmt(r) + r["Answer"] + "\n\n" for r in dev[:shots])
        preferred = [_preferred_letter(model, tok, head + shots_text + fmt(r)) for r in rows]
        answers[subject] = [p if i < right else "ABCD"[("ABCD".index(p) + 1) % 4] for i, p in enumerate(preferred)]
    return build(root / "scored", answers)


def _spec(path: Path, layout: str, shots: int):
    from edgezh.recipe import MCSet

    return MCSet(path=str(path), layout=layout, shots=[shots])


def test_ceval_zero_shot_scores_equal_the_hand_computed_expectation(tiny_hf, tiny_tok, tmp_path) -> None:
    # (questions, right): STEM = mean(2/3, 1/2), Hard = 1/2, Humanities = 0/2, overall = mean of the three subjects.
    subjects = {"computer_network": (3, 2), "advanced_mathematics": (2, 1), "law": (2, 0)}
    folder = _expected_answers(tiny_hf.model, tiny_tok, "ceval", subjects, _ceval_folder, tmp_path, shots=0)
    bench = multiple_choice.load(_spec(folder, "ceval", 0))
    items = multiple_choice.prompts(tiny_tok, bench, 0, max_length=512)
    result = multiple_choice.summarize(bench, items, multiple_choice.predict(tiny_hf, tiny_tok, items), 0)
    assert result["questions"] == 7 and result["correct"] == 3
    assert result["subjects"]["computer_network"]["accuracy"] == pytest.approx(2 / 3)
    assert result["groups"] == pytest.approx({"STEM": (2 / 3 + 1 / 2) / 2, "Hard": 0.5, "Humanities": 0.0})
    assert result["overall"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_cmmlu_five_shot_scores_equal_the_hand_computed_expectation(tiny_hf, tiny_tok, tmp_path) -> None:
    subjects = {"agronomy": (2, 2), "ancient_chinese": (3, 1)}  # Other; Social Science + China specific
    folder = _expected_answers(tiny_hf.model, tiny_tok, "cmmlu", subjects, _cmmlu_folder, tmp_path, shots=5)
    bench = multiple_choice.load(_spec(folder, "cmmlu", 5))
    items = multiple_choice.prompts(tiny_tok, bench, 5, max_length=1024)
    assert all(p.shots == 5 and not p.truncated for p in items)
    result = multiple_choice.summarize(bench, items, multiple_choice.predict(tiny_hf, tiny_tok, items), 5)
    assert result["groups"] == pytest.approx({"Other": 1.0, "Social Science": 1 / 3, "China specific": 1 / 3})
    assert result["overall"] == pytest.approx((1 + 1 / 3) / 2) and result["fewer_shots"] == 0


def test_long_prompts_drop_the_longest_examples_first(tiny_tok, tmp_path) -> None:
    folder = _cmmlu_folder(tmp_path / "c", {"agronomy": ["A", "B"]})
    bench = multiple_choice.load(_spec(folder, "cmmlu", 5))
    full = multiple_choice.prompts(tiny_tok, bench, 5, max_length=4096)
    limit = len(full[0].ids) - 1
    cut = multiple_choice.prompts(tiny_tok, bench, 5, max_length=limit)
    assert cut[0].shots < 5 and len(cut[0].ids) <= limit and not cut[0].truncated
    tiny = multiple_choice.prompts(tiny_tok, bench, 0, max_length=12)
    assert tiny[0].truncated and len(tiny[0].ids) == 12 and tiny[0].ids[0] == tiny_tok.bos_id


def test_loaders_read_the_official_layouts(tmp_path) -> None:
    ceval = multiple_choice.load(_spec(_ceval_folder(tmp_path / "ceval", {"law": ["B", "C"], "high_school_physics": ["D"]}), "ceval", 5))
    assert [s.name for s in ceval.subjects] == ["high_school_physics", "law"]  # val split, sorted
    assert ceval.subjects[0].groups == ("STEM", "Hard") and ceval.subjects[1].groups == ("Humanities",)
    assert [q.answer for q in ceval.subjects[1].questions] == ["B", "C"] and len(ceval.subjects[1].dev) == 5
    assert ceval.subjects[1].zh == "法学"
    cmmlu = multiple_choice.load(_spec(_cmmlu_folder(tmp_path / "cmmlu", {"chinese_history": ["A", "D", "C"]}), "cmmlu", 0))
    (subject,) = cmmlu.subjects
    assert subject.groups == ("Humanities", "China specific") and [q.answer for q in subject.questions] == ["A", "D", "C"]
    assert subject.dev == []  # 0-shot reads no dev split


def test_wrong_layouts_and_missing_answers_are_clear_errors(tmp_path) -> None:
    ceval = _ceval_folder(tmp_path / "ceval", {"law": ["A"]})
    cmmlu = _cmmlu_folder(tmp_path / "cmmlu", {"agronomy": ["A"]})
    with pytest.raises(UserError, match="this is the C-Eval layout .*set layout: ceval"):
        multiple_choice.load(_spec(ceval, "cmmlu", 0))
    with pytest.raises(UserError, match="this is the CMMLU layout .*set layout: cmmlu"):
        multiple_choice.load(_spec(cmmlu, "ceval", 0))
    (ceval / "val" / "law_val.csv").write_text("id,question,A,B,C,D\n0,问,甲,乙,丙,丁\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"law_val\.csv: no answer column.*test split has no public answers"):
        multiple_choice.load(_spec(ceval, "ceval", 0))
    (cmmlu / "test" / "agronomy.csv").write_text(",Question,A,B,C,D\n0,问,甲,乙,丙,丁\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"agronomy\.csv: no Answer column"):
        multiple_choice.load(_spec(cmmlu, "cmmlu", 0))
    (cmmlu / "test" / "agronomy.csv").write_text(",Question,A,B,C,D,Answer\n0,问,甲,乙,丙,丁,E\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"agronomy\.csv:2: answer 'E' is not one of A, B, C, D"):
        multiple_choice.load(_spec(cmmlu, "cmmlu", 0))
    (ceval / "dev" / "law_dev.csv").unlink()
    (ceval / "val" / "law_val.csv").write_text("id,question,A,B,C,D,answer\n0,问,甲,乙,丙,丁,A\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"5-shot needs dev/law_dev\.csv"):
        multiple_choice.load(_spec(ceval, "ceval", 5))
    with pytest.raises(UserError, match="no val/ folder"):
        multiple_choice.load(_spec(tmp_path, "ceval", 0))


def test_hsk_translate_is_seeded_and_well_formed(hsk_sentences) -> None:
    a = multiple_choice.hsk_translate(hsk_sentences, per_level=4, seed=3)
    b = multiple_choice.hsk_translate(hsk_sentences, per_level=4, seed=3)
    c = multiple_choice.hsk_translate(hsk_sentences, per_level=4, seed=4)
    assert [s.name for s in a.subjects] == [f"hsk{n}" for n in range(1, 7)] and a.questions == 24
    assert [s.questions for s in a.subjects] == [s.questions for s in b.subjects] != [s.questions for s in c.subjects]
    english = {s["chinese"].strip(): s["translation"]["en"].strip() for s in hsk_sentences}
    answers = [q.answer for s in a.subjects for q in s.questions]
    for s in a.subjects:
        assert len(s.dev) == 5
        for q in s.questions + s.dev:
            assert len(set(q.options)) == 4 and q.options["ABCD".index(q.answer)] == english[q.question]
    assert len(set(answers)) > 1  # the right answer moves


# --- Chinese replies ------------------------------------------------------------------------------


def test_cjk_share_counts_letters_not_punctuation() -> None:
    assert chinese_reply.cjk_share("你好，世界！") == 1.0
    assert chinese_reply.cjk_share("Hello 你好") == pytest.approx(2 / 3)  # a Latin word counts once
    assert chinese_reply.cjk_share("共3000人, 2 cats") == pytest.approx(2 / 5)
    assert chinese_reply.cjk_share("  ！？…") == 0.0 and not chinese_reply.is_chinese("")
    assert chinese_reply.is_chinese("我喜欢Python编程") and not chinese_reply.is_chinese("I like 编程")


def test_chinese_prompts_come_from_held_out_conversations(tmp_path, tiny_tok, tiny_hf) -> None:
    from edgezh.artifacts import Artifact

    rows = [{"messages": [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "今天天气怎么样？"},
                          {"role": "assistant", "content": "很好。"}]},
            {"messages": [{"role": "user", "content": "What is the weather?"}, {"role": "assistant", "content": "Fine."}]},
            {"messages": [{"role": "user", "content": "今天天气怎么样？"}, {"role": "assistant", "content": "重复"}]}]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    pairs = {"prompt": [{"role": "user", "content": "请介绍一下北京。"}], "chosen": [], "rejected": []}
    (tmp_path / "pairs_eval.jsonl").write_text(json.dumps(pairs, ensure_ascii=False) + "\n", encoding="utf-8")
    found = chinese_reply.prompts_from_data(Artifact("data", tmp_path, {}), 5)
    assert found == [[{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "今天天气怎么样？"}],
                     [{"role": "user", "content": "请介绍一下北京。"}]]
    ids = [tiny_tok.chat_prompt(c) for c in found]
    assert ids[0][0] == tiny_tok.bos_id and ids[0].count(tiny_tok.bos_id) == 1
    result = chinese_reply.evaluate(tiny_hf, tiny_tok, ids, max_new_tokens=4)
    assert result["prompts"] == 2 and result["generated_tokens"] <= 8 and 0.0 <= result["rate"] <= 1.0


# --- variants of a build ------------------------------------------------------------------------------


def test_lora_adapter_variant_is_the_base_plus_the_adapter(tiny_llama3, tiny_tok, tmp_path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgezh.artifacts import Artifact
    from edgezh.eval.variants import discover

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama3, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "sft" / "adapter")
    ids = tiny_tok.with_bos(tiny_tok.encode("我们今天学习中文。"))
    with torch.no_grad():
        expected = torch.log_softmax(model.merge_and_unload()(torch.tensor([ids])).logits[0], -1)
    base = Artifact("base", tmp_path / "base", {}, {"template": "llama3", "model_path": str(tiny_llama3)})
    variants, reference, _ = discover({"base": base, "sft": Artifact("sft", tmp_path / "sft", {}, {"method": "lora"})}, n_ctx=64)
    assert [v.name for v in variants] == ["base", "sft"] and reference is None
    with variants[1].open() as sft, variants[0].open() as plain:
        got = sft.log_probs(ids)
        assert (got - expected).abs().max() < 1e-4
        assert (plain.log_probs(ids) - got).abs().max() > 1e-3  # the adapter does change the model


# --- GGUFs without an HF folder (`edgezh eval`) -------------------------------------------------------------


def test_a_gguf_vocabulary_tokenizes_as_the_base_tokenizer(ggufs, tiny_tok, chinese_text) -> None:
    from edgezh.eval.tokens import GGUFTokenizer

    tok = GGUFTokenizer(ggufs["tiny-f16"])
    try:
        assert tok.template == "llama3" and len(tok) == len(tiny_tok) == 128256
        assert (tok.bos_id, tok.stop_ids) == (tiny_tok.bos_id, tiny_tok.stop_ids)
        text = chinese_text + " Hello, world 123 <|eot_id|>"
        assert tok.encode(text) == tiny_tok.encode(text)
        conversation = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好，请介绍一下北京。"}]
        assert tok.chat_prompt(conversation) == tiny_tok.chat_prompt(conversation)
        ids = tiny_tok.encode(chinese_text[:80])
        assert tok.decode(ids) == tiny_tok.decode(ids) == chinese_text[:80]
    finally:
        tok.close()


def test_bits_per_weight_from_the_tensor_table_equals_gguf_py(ggufs) -> None:
    import gguf

    from edgezh.export.quantize import describe

    for name in ("tiny-f16", "smol-q4_k_m", "smol-q8_0"):
        tensors = gguf.GGUFReader(ggufs[name]).tensors  # gguf-py parses the whole file
        expected = round(sum(int(t.n_bytes) for t in tensors) * 8 / sum(int(t.n_elements) for t in tensors), 3)
        assert describe(ggufs[name])["bits_per_weight"] == expected, name
