"""Multiple choice in the official C-Eval and CMMLU folder layouts, and the built-in `hsk-translate` set.

Layouts (as the official repositories ship them):

- C-Eval (hkust-nlp/ceval): `dev/<subject>_dev.csv` (five examples per subject, for few-shot),
  `val/<subject>_val.csv`, `test/<subject>_test.csv`; columns `id,question,A,B,C,D,answer`
  (dev also `explanation`). The test split has no public answers, so the val split is scored.
- CMMLU (haonan-li/CMMLU): `dev/<subject>.csv` and `test/<subject>.csv`; columns
  `(unnamed index),Question,A,B,C,D,Answer`. The test split is scored.
- `hsk-translate`: per HSK level, an HSK sentence and four English translations (the right one and
  three of other sentences of the same level), seeded; five more sentences per level are its dev split.

Two prompt protocols per set (`protocol` in the recipe entry), both raw text behind the BOS (no chat
template), both with k examples from dev (the first k, in file order):

- `official` (the default) follows the official evaluation scripts (C-Eval `evaluators/llama.py`, CMMLU
  `mp_utils.py`): a header naming the subject in Chinese (C-Eval: `以下是中国关于{科目}考试的单项选择题…`),
  each question ending in `答案：` (C-Eval) or `题目：…答案是：` (CMMLU), examples answered `答案：A`. The
  prediction is the letter A–D with the highest log-likelihood as the next token, read from the
  full-vocabulary distribution at the prompt's last position (the official scripts compare the same four
  logits). A prompt longer than `mc_max_length` loses its longest examples first (CMMLU's rule), then its
  oldest tokens (the BOS is kept).
- `lm-eval` reproduces lm-evaluation-harness 0.4's `ceval-valid_<subject>` and `cmmlu_<subject>` tasks
  (`_default_ceval_yaml`, `_default_template_yaml` and the generated per-subject descriptions): the header
  without 考试 for C-Eval (`以下是中国关于{科目}的单项选择题，请选出其中的正确答案。`), CMMLU's header
  with no `题目：` lead, `{question.strip()}\nA. {A}…\n答案：` (options as the file has them), examples
  answered with lm-eval's target delimiter (`答案： A`), and the scored continuations ` A` … ` D` (a space
  before the letter): each one's log-likelihood after the context, tokenized as lm-eval's HF model does
  (`encode(context + continuation)` minus `encode(context)`). A prompt longer than `mc_max_length` keeps
  every example and loses its oldest tokens, BOS included (lm-eval's left truncation).
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from edgezh.errors import UserError
from edgezh.eval import categories

LETTERS = ("A", "B", "C", "D")
PROTOCOLS = ("official", "lm-eval")
HSK_PER_LEVEL = 20
HSK_DEV = 5


@dataclass(frozen=True)
class Question:
    question: str  # as the file has it (each protocol strips what its script strips)
    options: tuple[str, str, str, str]
    answer: str  # "A"…"D"


@dataclass
class Subject:
    name: str
    zh: str
    groups: tuple[str, ...]  # report groups: category (C-Eval also "Hard"; CMMLU also "China specific")
    questions: list[Question]
    dev: list[Question] = field(default_factory=list)


@dataclass
class Benchmark:
    name: str  # shown in the report
    layout: str  # ceval | cmmlu | builtin
    subjects: list[Subject]
    protocol: str = "official"  # official | lm-eval (PROTOCOLS)

    @property
    def questions(self) -> int:
        return sum(len(s.questions) for s in self.subjects)


# ------------------------------------------------------------------ reading the official layouts

_CEVAL_COLUMNS = ("id", "question", "A", "B", "C", "D", "answer")
_CMMLU_COLUMNS = ("Question", "A", "B", "C", "D", "Answer")


def _read_csv(path: Path, required: tuple[str, ...], layout_hint: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                hint = ""
                if "answer" in missing or "Answer" in missing:
                    hint = " (C-Eval's test split has no public answers; the val split is scored)" if layout_hint == "ceval" else ""
                raise UserError(f"{path}: no {', '.join(missing)} column{'s' if len(missing) > 1 else ''}; "
                                f"the header is {','.join(header) or '(empty)'}, {layout_hint} files have "
                                f"{','.join(required)}{hint}")
            return list(reader)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise UserError(f"{path}: not a readable CSV file ({exc})") from None


def _questions(path: Path, rows: list[dict], columns: tuple[str, ...]) -> list[Question]:
    q, a, b, c, d, ans = columns
    out = []
    for number, row in enumerate(rows, 2):  # line 1 is the header
        answer = (row.get(ans) or "").strip().upper()
        if answer not in LETTERS:
            raise UserError(f"{path}:{number}: answer {row.get(ans)!r} is not one of A, B, C, D")
        out.append(Question(row.get(q) or "", tuple(row.get(k) or "" for k in (a, b, c, d)), answer))
    return out


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())[:8]
    return ", ".join(names) or "nothing"


def load_ceval(folder: Path, *, need_dev: bool, max_questions: int | None = None) -> Benchmark:
    """A C-Eval folder: the val split of every subject (and dev when few-shot is asked for)."""
    folder = _folder(folder)
    val = folder / "val"
    if not val.is_dir():
        if (folder / "test").is_dir() and any(not p.stem.endswith("_test") for p in (folder / "test").glob("*.csv")):
            raise UserError(f"{folder}: this is the CMMLU layout (test/<subject>.csv), not C-Eval's; set layout: cmmlu")
        raise UserError(f"{folder}: no val/ folder; C-Eval's layout is dev/<subject>_dev.csv, val/<subject>_val.csv "
                        f"(found: {_listing(folder)})")
    files = sorted(val.glob("*_val.csv"))
    if not files:
        raise UserError(f"{val}: no <subject>_val.csv files (found: {_listing(val)})")
    subjects = []
    for path in files:
        name = path.name.removesuffix("_val.csv")
        questions = _questions(path, _read_csv(path, _CEVAL_COLUMNS, "ceval"), _CEVAL_COLUMNS[1:])
        dev: list[Question] = []
        if need_dev:
            dev_path = folder / "dev" / f"{name}_dev.csv"
            if not dev_path.is_file():
                raise UserError(f"{folder}: 5-shot needs {dev_path.relative_to(folder)} (C-Eval's dev split)")
            dev = _questions(dev_path, _read_csv(dev_path, _CEVAL_COLUMNS, "ceval"), _CEVAL_COLUMNS[1:])
        subjects.append(Subject(name, categories.zh_name("ceval", name), categories.ceval_groups(name),
                                questions[:max_questions], dev))
    return Benchmark("C-Eval", "ceval", subjects)


def load_cmmlu(folder: Path, *, need_dev: bool, max_questions: int | None = None) -> Benchmark:
    """A CMMLU folder: the test split of every subject (and dev when few-shot is asked for)."""
    folder = _folder(folder)
    test = folder / "test"
    if (folder / "val").is_dir() or any(test.glob("*_test.csv")):
        raise UserError(f"{folder}: this is the C-Eval layout (val/<subject>_val.csv), not CMMLU's; set layout: ceval")
    if not test.is_dir():
        raise UserError(f"{folder}: no test/ folder; CMMLU's layout is dev/<subject>.csv, test/<subject>.csv "
                        f"(found: {_listing(folder)})")
    files = sorted(test.glob("*.csv"))
    if not files:
        raise UserError(f"{test}: no <subject>.csv files (found: {_listing(test)})")
    subjects = []
    for path in files:
        name = path.stem
        questions = _questions(path, _read_csv(path, _CMMLU_COLUMNS, "cmmlu"), _CMMLU_COLUMNS)
        dev: list[Question] = []
        if need_dev:
            dev_path = folder / "dev" / f"{name}.csv"
            if not dev_path.is_file():
                raise UserError(f"{folder}: 5-shot needs {dev_path.relative_to(folder)} (CMMLU's dev split)")
            dev = _questions(dev_path, _read_csv(dev_path, _CMMLU_COLUMNS, "cmmlu"), _CMMLU_COLUMNS)
        subjects.append(Subject(name, categories.zh_name("cmmlu", name), categories.cmmlu_groups(name),
                                questions[:max_questions], dev))
    return Benchmark("CMMLU", "cmmlu", subjects)


def _folder(folder: Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    return folder


def hsk_translate(sentences: list[dict], *, per_level: int | None = None, seed: int = 0) -> Benchmark:
    """The built-in set: per HSK level, choose the right English translation out of four."""
    per_level = per_level or HSK_PER_LEVEL
    rng = random.Random(seed)
    by_level: dict[int, list[dict]] = defaultdict(list)
    for s in sentences:
        if s.get("chinese") and (s.get("translation") or {}).get("en"):
            by_level[int(s["hsk_level"])].append(s)
    subjects = []
    for level in sorted(by_level):
        pool = sorted(by_level[level], key=lambda s: s["id"])
        rng.shuffle(pool)
        chosen = pool[:HSK_DEV + per_level]
        made = [_translation_question(s, pool, rng) for s in chosen]
        subjects.append(Subject(f"hsk{level}", f"HSK {level} 级句子英译", ("HSK",), made[HSK_DEV:], made[:HSK_DEV]))
    return Benchmark("hsk-translate", "builtin", subjects)


def _translation_question(sentence: dict, pool: list[dict], rng: random.Random) -> Question:
    right = sentence["translation"]["en"].strip()
    others = sorted({s["translation"]["en"].strip() for s in pool} - {right})
    wrong = rng.sample(others, 3)
    slot = rng.randrange(4)
    options = wrong[:slot] + [right] + wrong[slot:]
    return Question(sentence["chinese"].strip(), tuple(options), LETTERS[slot])


# ------------------------------------------------------------------ prompts and scoring


@dataclass(frozen=True)
class _Style:
    """How one protocol writes one layout's prompt."""

    header: str  # {zh}: the subject's Chinese name
    lead: str  # before each question
    ask: str  # after the options
    before_answer: str  # between `ask` and the letter (examples and scored continuations)
    strip_options: bool


_STYLES = {
    ("official", "ceval"): _Style("以下是中国关于{zh}考试的单项选择题，请选出其中的正确答案。\n\n", "", "答案：", "", True),
    ("official", "cmmlu"): _Style("以下是关于{zh}的单项选择题，请直接给出正确答案的选项。\n\n", "题目：", "答案是：", "", True),
    ("official", "builtin"): _Style("以下是关于{zh}的单项选择题，请选出句子的正确英文翻译。\n\n", "句子：", "答案：", "", True),
    ("lm-eval", "ceval"): _Style("以下是中国关于{zh}的单项选择题，请选出其中的正确答案。\n\n", "", "答案：", " ", False),
    ("lm-eval", "cmmlu"): _Style("以下是关于{zh}的单项选择题，请直接给出正确答案的选项。\n\n", "", "答案：", " ", False),
}


def _style(layout: str, protocol: str) -> _Style:
    try:
        return _STYLES[(protocol, layout)]
    except KeyError:
        raise UserError(f"protocol {protocol!r} has no {layout} prompt (lm-eval reproduces ceval-valid and cmmlu only)") from None


def format_question(layout: str, q: Question, with_answer: bool, protocol: str = "official") -> str:
    style = _style(layout, protocol)
    options = tuple(o.strip() for o in q.options) if style.strip_options else q.options
    text = style.lead + q.question.strip() + "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, options))
    text += "\n" + style.ask
    return text + (f"{style.before_answer}{q.answer}\n\n" if with_answer else "")


def prompt_text(layout: str, subject: Subject, q: Question, examples: list[Question], protocol: str = "official") -> str:
    return (_style(layout, protocol).header.format(zh=subject.zh)
            + "".join(format_question(layout, e, True, protocol) for e in examples)
            + format_question(layout, q, False, protocol))


@dataclass(frozen=True)
class Prompt:
    subject: str
    ids: list[int]
    answer: str
    shots: int  # examples that fit
    truncated: bool  # oldest tokens cut
    choices: tuple[tuple[int, ...], ...] | None = None  # lm-eval: the token ids of " A" … " D" after `ids`


def prompts(tok, bench: Benchmark, shots: int, max_length: int) -> list[Prompt]:
    """Token ids of every question's prompt with `shots` dev examples, fitted into `max_length`."""
    out = []
    for subject in bench.subjects:
        if shots > len(subject.dev):
            raise UserError(f"{bench.name}/{subject.name}: {shots}-shot needs {shots} dev examples, the dev split has {len(subject.dev)}")
        for q in subject.questions:
            if bench.protocol == "lm-eval":
                out.append(_lm_eval_prompt(tok, bench, subject, q, shots, max_length))
                continue
            examples = list(subject.dev[:shots])
            ids = tok.with_bos(tok.encode(prompt_text(bench.layout, subject, q, examples)))
            while len(ids) > max_length and examples:
                longest = max(examples, key=lambda e: len(format_question(bench.layout, e, True)))
                examples.remove(longest)
                ids = tok.with_bos(tok.encode(prompt_text(bench.layout, subject, q, examples)))
            truncated = len(ids) > max_length
            if truncated:
                ids = ids[:1] + ids[len(ids) - max_length + 1:] if tok.bos_id is not None else ids[-max_length:]
            out.append(Prompt(subject.name, ids, q.answer, len(examples), truncated))
    return out


def _lm_eval_prompt(tok, bench: Benchmark, subject: Subject, q: Question, shots: int, max_length: int) -> Prompt:
    """lm-eval's context and continuations: every example kept, the context cut from the left to fit."""
    text = prompt_text(bench.layout, subject, q, list(subject.dev[:shots]), "lm-eval")
    before = _style(bench.layout, "lm-eval").before_answer
    ids = tok.with_bos(tok.encode(text))
    choices = tuple(tuple(tok.with_bos(tok.encode(text + before + letter))[len(ids):]) for letter in LETTERS)
    if not all(choices):
        raise UserError(f"{bench.name}/{subject.name}: the tokenizer merges an answer letter into the prompt's last token")
    keep = max_length - (max(len(c) for c in choices) - 1)
    truncated = len(ids) > keep
    return Prompt(subject.name, ids[-keep:] if truncated else ids, q.answer, shots, truncated, choices)


def predict(backend, tok, items: list[Prompt]) -> list[str]:
    """The letter whose answer the model finds most likely after each prompt: the next-token letter (official)
    or the continuation " A" … " D" (lm-eval; several tokens are summed, token by token)."""
    letter_ids = [tok.letter_id(letter) for letter in LETTERS] if any(p.choices is None for p in items) else []
    preds = []
    for p in items:
        choices = p.choices or tuple((i,) for i in letter_ids)
        scores = choice_scores(backend, p.ids, choices)
        preds.append(LETTERS[max(range(4), key=scores.__getitem__)])
    return preds


def choice_scores(backend, ids: list[int], choices: tuple[tuple[int, ...], ...]) -> list[float]:
    """Log-likelihood of each continuation after `ids` (one forward pass when every one is a single token)."""
    if all(len(c) == 1 for c in choices):
        row = backend.log_probs(ids, [len(ids) - 1])[0]
        return [float(row[c[0]]) for c in choices]
    scores = []
    for c in choices:
        full = list(ids) + list(c[:-1])
        rows = backend.log_probs(full, list(range(len(ids) - 1, len(full))))
        scores.append(sum(float(rows[k][token]) for k, token in enumerate(c)))
    return scores


def summarize(bench: Benchmark, items: list[Prompt], preds: list[str], shots: int) -> dict:
    """Accuracy per subject, per report group (mean of its subjects) and overall (mean over subjects)."""
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for p, pred in zip(items, preds):
        total[p.subject] += 1
        right[p.subject] += pred == p.answer
    subjects = {s.name: {"accuracy": right[s.name] / total[s.name], "questions": total[s.name], "groups": list(s.groups)}
                for s in bench.subjects if total[s.name]}
    groups: dict[str, list[float]] = defaultdict(list)
    for s in bench.subjects:
        if s.name in subjects:
            for g in s.groups:
                groups[g].append(subjects[s.name]["accuracy"])
    accs = [v["accuracy"] for v in subjects.values()]
    return {
        "overall": sum(accs) / len(accs) if accs else None,
        "questions": sum(total.values()),
        "correct": sum(right.values()),
        "groups": {g: sum(v) / len(v) for g, v in groups.items()},
        "subjects": subjects,
        "shots": shots,
        "fewer_shots": sum(p.shots < shots for p in items),
        "truncated": sum(p.truncated for p in items),
    }


def load(spec, *, hsk_sentences=None) -> Benchmark:
    """The benchmark an `MCSet` recipe entry names."""
    need_dev = any(k > 0 for k in spec.shots)
    if spec.builtin == "hsk-translate":
        if hsk_sentences is None:
            from edgezh.data.corpora import hsk_sentences as read

            hsk_sentences = read()
        return hsk_translate(hsk_sentences, per_level=spec.max_questions, seed=spec.seed)
    loader = load_ceval if spec.layout == "ceval" else load_cmmlu
    bench = loader(Path(spec.path), need_dev=need_dev, max_questions=spec.max_questions)
    bench.protocol = spec.protocol
    return bench
