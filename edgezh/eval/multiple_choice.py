"""Multiple choice in the official C-Eval and CMMLU folder layouts, and the built-in `hsk-translate` set.

Layouts (as the official repositories ship them):

- C-Eval (hkust-nlp/ceval): `dev/<subject>_dev.csv` (five examples per subject, for few-shot),
  `val/<subject>_val.csv`, `test/<subject>_test.csv`; columns `id,question,A,B,C,D,answer`
  (dev also `explanation`). The test split has no public answers, so the val split is scored.
- CMMLU (haonan-li/CMMLU): `dev/<subject>.csv` and `test/<subject>.csv`; columns
  `(unnamed index),Question,A,B,C,D,Answer`. The test split is scored.
- `hsk-translate`: per HSK level, an HSK sentence and four English translations (the right one and
  three of other sentences of the same level), seeded; five more sentences per level are its dev split.

Prompts follow the official evaluation scripts (C-Eval `evaluators/llama.py`, CMMLU
`mp_utils.py`): a header naming the subject in Chinese, k examples from dev with their answers, then
the question ending in `答案：` (C-Eval) or `答案是：` (CMMLU), as raw text behind the BOS (no chat
template). The prediction is the letter A–D with the highest log-likelihood as the next token,
read from the full-vocabulary distribution at the prompt's last position (the official scripts
compare the same four logits). A prompt longer than `mc_max_length` loses its longest examples
first (CMMLU's rule), then its oldest tokens.
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
HSK_PER_LEVEL = 20
HSK_DEV = 5


@dataclass(frozen=True)
class Question:
    question: str
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
        out.append(Question((row.get(q) or "").strip(), tuple((row.get(k) or "").strip() for k in (a, b, c, d)), answer))
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

_HEADER = {
    "ceval": "以下是中国关于{zh}考试的单项选择题，请选出其中的正确答案。\n\n",
    "cmmlu": "以下是关于{zh}的单项选择题，请直接给出正确答案的选项。\n\n",
    "builtin": "以下是关于{zh}的单项选择题，请选出句子的正确英文翻译。\n\n",
}
_LEAD = {"ceval": "", "cmmlu": "题目：", "builtin": "句子："}
_ASK = {"ceval": "答案：", "cmmlu": "答案是：", "builtin": "答案："}


def format_question(layout: str, q: Question, with_answer: bool) -> str:
    text = _LEAD[layout] + q.question + "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, q.options))
    text += "\n" + _ASK[layout]
    return text + (f"{q.answer}\n\n" if with_answer else "")


def prompt_text(layout: str, subject: Subject, q: Question, examples: list[Question]) -> str:
    return (_HEADER[layout].format(zh=subject.zh) + "".join(format_question(layout, e, True) for e in examples)
            + format_question(layout, q, False))


@dataclass(frozen=True)
class Prompt:
    subject: str
    ids: list[int]
    answer: str
    shots: int  # examples that fit
    truncated: bool  # oldest tokens cut


def prompts(tok, bench: Benchmark, shots: int, max_length: int) -> list[Prompt]:
    """Token ids of every question's prompt with `shots` dev examples, fitted into `max_length`."""
    out = []
    for subject in bench.subjects:
        if shots > len(subject.dev):
            raise UserError(f"{bench.name}/{subject.name}: {shots}-shot needs {shots} dev examples, the dev split has {len(subject.dev)}")
        for q in subject.questions:
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


def predict(backend, tok, items: list[Prompt]) -> list[str]:
    """The letter each prompt's next-token distribution ranks highest among A–D."""
    letter_ids = [tok.letter_id(letter) for letter in LETTERS]
    preds = []
    for p in items:
        row = backend.log_probs(p.ids, [len(p.ids) - 1])[0]
        scores = [float(row[i]) for i in letter_ids]
        preds.append(LETTERS[max(range(4), key=scores.__getitem__)])
    return preds


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
    if spec.layout == "ceval":
        return load_ceval(Path(spec.path), need_dev=need_dev, max_questions=spec.max_questions)
    return load_cmmlu(Path(spec.path), need_dev=need_dev, max_questions=spec.max_questions)
