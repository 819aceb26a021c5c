"""edgezh against the tools its users compare with: Ollama's stop set, lm-evaluation-harness's C-Eval/CMMLU
prompts and scores, Meta's published Llama 3 shapes (offline dry-run plans).

The lm-eval tests run lm-eval itself (`lm_eval` 0.4, installed beside edgezh with `-c constraints.txt`) and
are skipped, saying why, where it is not installed; the byte-for-byte prompt test needs nothing but edgezh.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from edgezh import templates
from edgezh.eval import multiple_choice
from edgezh.eval.tokens import EvalTokenizer
from edgezh.export import modelfile
from edgezh.recipe import MCSet, ModelfileConfig
from test_runtime_fixtures import engine_for, tiny31_gguf, tiny_gguf  # noqa: F401  (fixtures)

# --- 1. Ollama's stop set ---------------------------------------------------------------------------------

# The stops of Ollama's own models for each format: the `params` of its template detection
# (ollama/ollama template/llama3-instruct.json and template/chatml.json) and of the library's llama3 /
# llama3.1 models. Ollama's llama3.1 params carry no <|eom_id|>: llama.cpp ends generation on it as an
# end-of-generation token (ollama/ollama#6071, fixed by llama.cpp's EOM handling).
OLLAMA_LIBRARY_STOPS = {
    "llama3": {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"},
    "llama3.1": {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"},
    "chatml": {"<|im_start|>", "<|im_end|>"},
}


@pytest.mark.parametrize("fmt", templates.names())
def test_modelfile_stops_are_a_superset_of_ollamas_library_stops(fmt: str) -> None:
    text = modelfile.render("m.gguf", fmt, ModelfileConfig(), title="t")
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    assert set(stops) >= OLLAMA_LIBRARY_STOPS[fmt], set(stops)
    assert stops == list(templates.get(fmt).stop_tokens)  # the registry is the one source
    if fmt == "llama3.1":
        assert "<|eom_id|>" in stops  # end of a tool-call turn


@pytest.mark.parametrize("fixture, fmt, header", [("tiny_gguf", "llama3", "<|start_header_id|>"),
                                                  ("tiny_gguf", "llama3", "<|end_header_id|>"),
                                                  ("tiny31_gguf", "llama3.1", "<|start_header_id|>")])
def test_a_reply_that_reaches_a_header_ends_there(fixture: str, fmt: str, header: str,
                                                  request: pytest.FixtureRequest) -> None:
    """llama.cpp is made to write 你好, then the header token, then more (a grammar whose only sentence that
    is): the engine ends the reply at the header, which never reaches the text."""
    from edgezh.runtime.engine import SamplingParams

    engine = engine_for(request.getfixturevalue(fixture))
    assert engine.format.name == fmt
    header_id = engine.tokenize(header, special=True)
    assert len(header_id) == 1 and header_id[0] in engine.stop_ids
    generation = engine.chat([{"role": "user", "content": "你好"}],
                             SamplingParams(max_tokens=12, temperature=0, grammar=f'root ::= "你好" {header} "user"'))
    assert generation.result() == "你好"
    assert generation.finish_reason == "stop" and generation.stop_token == header
    assert header_id[0] not in generation.tokens


def test_header_stops_come_from_the_registry_not_the_gguf(tiny31_gguf: Path) -> None:
    """The GGUF's end-of-generation tokens (EOS/EOT/EOM, as llama.cpp reads them) are the end tokens only;
    the headers stop the runtime because the registry lists them."""
    import llama_cpp

    engine = engine_for(tiny31_gguf)
    fmt = templates.get("llama3.1")
    for token in fmt.stop_tokens:
        (token_id,) = engine.tokenize(token, special=True)
        assert llama_cpp.llama_vocab_is_eog(engine.vocab, token_id) == (token in fmt.end_tokens), token
    assert {engine.token_text(i) for i in engine.stop_ids} == set(fmt.stop_tokens)


# --- 2. C-Eval / CMMLU as lm-eval scores them --------------------------------------------------------------

DEV = {"question": " 下列哪项是有效推理？ ", "options": ("甲", " 乙", "丙 ", "丁"), "answer": "B"}
VAL = {"question": "以下说法正确的是？", "options": ("一", "二", "三", "四"), "answer": "C"}

# One question after one dev example, spelled out: the official scripts' prompts (C-Eval evaluators/llama.py,
# CMMLU mp_utils.py, edgezh strips the cells) and lm-eval 0.4's ceval-valid_logic / cmmlu_agronomy
# (description + doc_to_text + target delimiter " " + fewshot delimiter "\n\n"; cells as the file has them).
EXPECTED = {
    ("ceval", "official"): ("以下是中国关于逻辑学考试的单项选择题，请选出其中的正确答案。\n\n"
                            "下列哪项是有效推理？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：B\n\n"
                            "以下说法正确的是？\nA. 一\nB. 二\nC. 三\nD. 四\n答案：", "C"),
    ("ceval", "lm-eval"): ("以下是中国关于逻辑学的单项选择题，请选出其中的正确答案。\n\n"
                           "下列哪项是有效推理？\nA. 甲\nB.  乙\nC. 丙 \nD. 丁\n答案： B\n\n"
                           "以下说法正确的是？\nA. 一\nB. 二\nC. 三\nD. 四\n答案：", " C"),
    ("cmmlu", "official"): ("以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
                            "题目：下列哪项是有效推理？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是：B\n\n"
                            "题目：以下说法正确的是？\nA. 一\nB. 二\nC. 三\nD. 四\n答案是：", "C"),
    ("cmmlu", "lm-eval"): ("以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
                           "下列哪项是有效推理？\nA. 甲\nB.  乙\nC. 丙 \nD. 丁\n答案： B\n\n"
                           "以下说法正确的是？\nA. 一\nB. 二\nC. 三\nD. 四\n答案：", " C"),
}


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _row(q: dict) -> list[str]:
    return [q["question"], *q["options"], q["answer"]]


def write_set(root: Path, layout: str, subjects: dict[str, tuple[list[dict], list[dict]]]) -> Path:
    """A folder in the official C-Eval or CMMLU layout: per subject (dev rows, scored rows)."""
    for subject, (dev, scored) in subjects.items():
        if layout == "ceval":
            _write_csv(root / "dev" / f"{subject}_dev.csv", ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
                       [[str(i), *_row(q), "解析"] for i, q in enumerate(dev)])
            _write_csv(root / "val" / f"{subject}_val.csv", ["id", "question", "A", "B", "C", "D", "answer"],
                       [[str(i), *_row(q)] for i, q in enumerate(scored)])
        else:
            for split, rows in (("dev", dev), ("test", scored)):
                _write_csv(root / split / f"{subject}.csv", ["", "Question", "A", "B", "C", "D", "Answer"],
                           [[str(i), *_row(q)] for i, q in enumerate(rows)])
    return root


def _bench(folder: Path, layout: str, protocol: str, shots: int):
    return multiple_choice.load(MCSet(path=str(folder), layout=layout, shots=[shots], protocol=protocol))


@pytest.mark.parametrize("layout, protocol", sorted(EXPECTED))
def test_both_prompt_renderings_byte_for_byte_on_one_question(layout: str, protocol: str, tmp_path: Path,
                                                              tiny_llama3: Path) -> None:
    subject = "logic" if layout == "ceval" else "agronomy"
    bench = _bench(write_set(tmp_path, layout, {subject: ([DEV] * 5, [VAL])}), layout, protocol, 5)
    (s,) = bench.subjects
    text, continuation = EXPECTED[(layout, protocol)]
    assert multiple_choice.prompt_text(layout, s, s.questions[0], s.dev[:1], protocol) == text
    # the scored token ids: BOS + the text; official reads the letter's logit, lm-eval scores " C" after it
    tok = EvalTokenizer(tiny_llama3, "llama3")
    one_shot = multiple_choice.Benchmark(bench.name, layout, [multiple_choice.Subject(s.name, s.zh, s.groups, s.questions, s.dev[:1])], protocol)
    (prompt,) = multiple_choice.prompts(tok, one_shot, 1, max_length=2048)
    assert prompt.ids == [tok.bos_id] + tok.encode(text) and prompt.answer == "C"
    if protocol == "official":
        assert prompt.choices is None and tok.encode(continuation) == [tok.letter_id("C")]
    else:
        assert tok.encode(text + continuation)[len(prompt.ids) - 1:] == list(prompt.choices[2])


def test_lm_eval_protocol_needs_a_ceval_or_cmmlu_layout() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="protocol: lm-eval.*layout: ceval"):
        MCSet(builtin="hsk-translate", protocol="lm-eval")
    assert MCSet(builtin="hsk-translate").protocol == "official"


def test_the_report_heading_names_the_protocol(tmp_path: Path, tiny_llama3: Path) -> None:
    from edgezh.eval import passes, report
    from edgezh.eval.backends import HFBackend

    tok = EvalTokenizer(tiny_llama3, "llama3")
    folder = write_set(tmp_path, "ceval", {"logic": ([DEV] * 5, [VAL, VAL])})
    mc_sets = []
    for protocol in multiple_choice.PROTOCOLS:
        bench = _bench(folder, "ceval", protocol, 0)
        mc_sets.append((bench, 0, multiple_choice.prompts(tok, bench, 0, 512)))
    results = passes.new_results("t", "llama3", tok, [], None, context_length=64, stride=32, max_tokens=64, tokenizer="t",
                                 corpus_facts={}, mc_sets=mc_sets, reply_prompts=[], reply_source="none",
                                 reply_max_tokens=8, notes=[])
    with HFBackend.load(tiny_llama3) as backend:
        for entry, (bench, shots, items) in zip(results["multiple_choice"], mc_sets):
            entry["by_variant"]["base"] = multiple_choice.summarize(bench, items, multiple_choice.predict(backend, tok, items), shots)
    text = report.render({**results, "chat": "edgezh chat t", "built": []})
    assert "### C-Eval, 0-shot, official protocol (2 questions)" in text
    assert "### C-Eval, 0-shot, lm-eval protocol (2 questions)" in text


# lm-eval itself (skipped where it is not installed)

def _lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval -c constraints.txt); "
                               "the byte-for-byte test above still pins its prompts")


def _questions(tag: str, n: int) -> list[dict]:
    """`n` questions whose cells carry the spaces real files have (lm-eval keeps them, the official prompt strips)."""
    facts = [("水的化学式是", ("H2O", " CO2", "NaCl ", "O2"), "A"), ("中国的首都是", ("上海", "北京", " 广州", "深圳"), "B"),
             ("一年有几个季节？", ("两个", "三个", "四个", "五个"), "C"), ("太阳从哪边升起？", ("西边", "南边", "北边", "东边"), "D"),
             (" 孔子是哪个学派的创始人？", ("道家", "儒家", "法家", "墨家"), "B"), ("长城主要位于哪个国家？", ("中国", "日本", "印度", "蒙古"), "A")]
    return [{"question": f"{facts[i % len(facts)][0]}（{tag}{i}）", "options": facts[i % len(facts)][1],
             "answer": facts[i % len(facts)][2]} for i in range(n)]


def _lm_eval_task(layout: str, subject: str, folder: Path):
    """lm-eval's own task for one subject (its YAML files, unchanged), reading the local folder."""
    import datasets
    import yaml
    from lm_eval.api.task import ConfigurableTask

    tasks = Path(_lm_eval().__file__).parent / "tasks" / layout
    base, own = ("_default_ceval_yaml", f"ceval-valid_{subject}.yaml") if layout == "ceval" else \
        ("_default_template_yaml", f"cmmlu_{subject}.yaml")
    config = yaml.safe_load((tasks / base).read_text(encoding="utf-8"))
    config.update(yaml.safe_load((tasks / own).read_text(encoding="utf-8")))
    for key in ("include", "group", "tag"):
        config.pop(key, None)
    files = {"val": folder / "val" / f"{subject}_val.csv", "dev": folder / "dev" / f"{subject}_dev.csv"} if layout == "ceval" \
        else {"test": folder / "test" / f"{subject}.csv", "dev": folder / "dev" / f"{subject}.csv"}

    def rows(path: Path) -> list[dict]:  # strings, as the hub datasets hold them
        return [{k: v for k, v in row.items() if k} for row in csv.DictReader(open(path, encoding="utf-8", newline=""))]

    splits = datasets.DatasetDict({split: datasets.Dataset.from_list(rows(path)) for split, path in files.items()})
    config["custom_dataset"] = lambda **_: splits
    return ConfigurableTask(config=config)


def _requests(task, shots: int) -> list[tuple[str, list[str]]]:
    """(context, continuations) of every scored document, as lm-eval builds them."""
    docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
    out = []
    for i, doc in enumerate(docs):
        context = task.fewshot_context(doc, num_fewshot=shots)
        requests = task.construct_requests(doc, context, metadata=(task.config.task, i, 1))
        out.append((context, [r.arguments[1] for r in requests]))
        assert all(r.arguments[0] == context for r in requests)
    return out


@pytest.mark.parametrize("layout, subject", [("ceval", "logic"), ("ceval", "high_school_physics"), ("cmmlu", "agronomy")])
@pytest.mark.parametrize("shots", [0, 5])
def test_lm_eval_protocol_renders_lm_evals_own_prompts(layout: str, subject: str, shots: int, tmp_path: Path) -> None:
    _lm_eval()
    folder = write_set(tmp_path, layout, {subject: (_questions("例", 5), _questions("题", 4))})
    expected = _requests(_lm_eval_task(layout, subject, folder), shots)
    bench = _bench(folder, layout, "lm-eval", shots)
    (s,) = bench.subjects
    ours = [(multiple_choice.prompt_text(layout, s, q, s.dev[:shots], "lm-eval"), [f" {x}" for x in multiple_choice.LETTERS])
            for q in s.questions]
    assert ours == expected


def test_subject_names_equal_lm_evals_descriptions() -> None:
    """Every ceval-valid_* and cmmlu_* task's description is the header edgezh writes for that subject."""
    import yaml

    from edgezh.eval import categories

    root = Path(_lm_eval().__file__).parent / "tasks"
    seen = 0
    for layout, pattern, table in (("ceval", "ceval-valid_*.yaml", categories.CEVAL), ("cmmlu", "cmmlu_*.yaml", categories.CMMLU)):
        for path in sorted((root / layout).glob(pattern)):
            task = yaml.safe_load(path.read_text(encoding="utf-8"))
            name = task["dataset_name"]
            subject = multiple_choice.Subject(name, categories.zh_name(layout, name), (), [])
            q = multiple_choice.Question("问", ("甲", "乙", "丙", "丁"), "A")
            assert name in table and multiple_choice.prompt_text(layout, subject, q, [], "lm-eval").startswith(task["description"]), path.name
            seen += 1
    assert seen == len(categories.CEVAL) + len(categories.CMMLU)


def _bos_tokenizer(tiny_llama3: Path, folder: Path) -> Path:
    """The tiny model's tokenizer made to add <|begin_of_text|> itself, as Meta's Llama 3 tokenizer.json does
    (ByteLevel, then a TemplateProcessing that prepends the BOS)."""
    folder.mkdir()
    for path in tiny_llama3.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")) or path.name == "chat_template.jinja":
            (folder / path.name).write_bytes(path.read_bytes())
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    spec["post_processor"] = {"type": "Sequence", "processors": [spec["post_processor"], {
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000], "tokens": ["<|begin_of_text|>"]}}}]}
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return folder


def test_lm_eval_token_ids_with_a_bos_adding_llama3_tokenizer(tiny_llama3: Path, tmp_path: Path) -> None:
    """With a tokenizer that adds the BOS itself (Meta's does), lm-eval's HF model scores BOS + context, then the
    continuation split off `encode(context + " A")`: the ids edgezh's lm-eval prompts hold."""
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    tokenizer = _bos_tokenizer(tiny_llama3, tmp_path / "tokenizer")
    lm = HFLM(pretrained=str(tiny_llama3), tokenizer=str(tokenizer), device="cpu", dtype="float32", batch_size=1)
    folder = write_set(tmp_path / "set", "ceval", {"logic": (_questions("例", 5), _questions("题", 3))})
    tok = EvalTokenizer(tokenizer, "llama3")
    for shots in (0, 5):
        bench = _bench(folder, "ceval", "lm-eval", shots)
        items = multiple_choice.prompts(tok, bench, shots, max_length=2048)
        for (context, continuations), prompt in zip(_requests(_lm_eval_task("ceval", "logic", folder), shots), items):
            pairs = [lm._encode_pair(context, c) for c in continuations]
            assert all(ctx == prompt.ids for ctx, _ in pairs) and prompt.ids[0] == tok.bos_id
            assert tuple(tuple(cont) for _, cont in pairs) == prompt.choices


@pytest.mark.slow
def test_lm_eval_protocol_predicts_what_lm_eval_predicts(smollm2: Path, tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct (real weights), a C-Eval-layout set of 2 subjects × 5 dev + 6 val, 0- and 5-shot:
    edgezh's transformers backend and lm-eval's HF model give the same log-likelihoods and the same answers."""
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    from edgezh.eval.backends import HFBackend

    subjects = ("logic", "high_school_physics")
    folder = write_set(tmp_path, "ceval", {s: (_questions("例", 5), _questions(s[:2], 6)) for s in subjects})
    lm = HFLM(pretrained=str(smollm2), device="cpu", dtype="float32", batch_size=1)
    tok = EvalTokenizer(smollm2, "chatml")
    with HFBackend.load(smollm2) as backend:
        for shots in (0, 5):
            bench = _bench(folder, "ceval", "lm-eval", shots)
            items = multiple_choice.prompts(tok, bench, shots, max_length=2048)
            ours = [multiple_choice.choice_scores(backend, p.ids, p.choices) for p in items]
            theirs = []
            for subject in (s.name for s in bench.subjects):  # edgezh's order: sorted by file name
                requests = _requests(_lm_eval_task("ceval", subject, folder), shots)
                instances = [_instance(context, c, i) for i, (context, conts) in enumerate(requests) for c in conts]
                lls = [ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)]
                theirs += [lls[i:i + 4] for i in range(0, len(lls), 4)]
            assert len(ours) == len(theirs) == 12
            for mine, lm_eval_lls in zip(ours, theirs):
                assert mine == pytest.approx(lm_eval_lls, abs=1e-4)
                assert max(range(4), key=mine.__getitem__) == max(range(4), key=lm_eval_lls.__getitem__)
            preds = multiple_choice.predict(backend, tok, items)
            assert preds == ["ABCD"[max(range(4), key=ll.__getitem__)] for ll in theirs]


def _instance(context: str, continuation: str, index: int):
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=index)


# --- 3. offline plans for the shipped recipes ------------------------------------------------------------

SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_dry_run_shows_memory_and_disk_offline(path: Path, tmp_path: Path) -> None:
    from edgezh.recipe_load import load_recipe

    recipe = load_recipe(path, [])
    hub = tmp_path / "hf"  # an empty hub cache: nothing downloaded, nothing reachable
    result = run_cli("build", str(path), "--dry-run", cwd=tmp_path, HF_HOME=str(hub), HF_HUB_CACHE=str(hub / "hub"),
                     HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "no estimates" not in text and "disk for the outputs" in text, text
    trains = any(getattr(recipe, stage, None) is not None for stage in ("pretrain", "sft", "dpo"))
    assert ("GPU memory per training process" in text) is trains
    if recipe.export.gguf is not None:  # the GGUF sizes: on disk and to run
        assert "memory to run each GGUF" in text
        for kind in [recipe.export.gguf.outtype, *recipe.export.gguf.quantize]:
            assert re.search(rf"{re.escape(recipe.name)}-{kind}\.gguf\s*│\s*\d+\.\d\d\s*│", text), kind
    assert trains or recipe.export.gguf is not None  # every shipped recipe shows a memory plan
    if recipe.base.hub is not None:
        assert "from the published shape of Llama 3" in text and "base download (hub cache, bf16)" in text
    assert not (tmp_path / "builds").exists()


def test_a_cached_config_wins_over_the_published_shape(tmp_path: Path) -> None:
    """A config.json in the hub cache (the real layout: refs/main → snapshots/<commit>/config.json) is read first."""
    from edgezh.models import published

    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--meta-llama--Meta-Llama-3-8B-Instruct"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    config = {**published.lookup("meta-llama/Meta-Llama-3-8B-Instruct").config(), "num_hidden_layers": 4}
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps(config), encoding="utf-8")
    result = run_cli("build", str(ROOT / "recipes" / "llama3-8b-zh-agent.yaml"), "--dry-run", cwd=tmp_path,
                     HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert "4 layers × 4096" in result.stdout and "in the hub cache" in result.stdout
    assert "published shape" not in result.stdout


def test_published_shapes_agree_with_meta_llama_models_and_parameter_counts() -> None:
    """Each shape against the model args Meta ships in llama-models (intermediate size derived as Meta's
    FeedForward does), and the parameter counts Meta publishes."""
    from llama_models.sku_list import resolve_model

    from edgezh.estimate import _from_hf
    from edgezh.models import published

    descriptors = {"llama3-8b": "Llama-3-8B", "llama3-70b": "Llama-3-70B", "llama3.1-8b": "Llama3.1-8B",
                   "llama3.1-70b": "Llama3.1-70B", "llama3.2-1b": "Llama3.2-1B", "llama3.2-3b": "Llama3.2-3B"}
    counts = {"llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496, "llama3.2-1b": 1_235_814_400,
              "llama3.2-3b": 3_212_749_824}
    assert set(descriptors) == set(published.SHAPES)
    for key, shape in published.SHAPES.items():
        for suffix in ("", "-Instruct"):
            sku = resolve_model(descriptors[key] + suffix)
            args = sku.arch_args
            hidden = int(2 * 4 * args["dim"] / 3)
            hidden = int(args["ffn_dim_multiplier"] * hidden)
            hidden = args["multiple_of"] * ((hidden + args["multiple_of"] - 1) // args["multiple_of"])
            assert (shape.hidden_size, shape.num_hidden_layers, shape.num_attention_heads, shape.num_key_value_heads,
                    shape.vocab_size, shape.intermediate_size) == (args["dim"], args["n_layers"], args["n_heads"],
                                                                   args["n_kv_heads"], args["vocab_size"], hidden), key
            assert shape.rope_theta == args["rope_theta"] and shape.rms_norm_eps == args["norm_eps"]
            assert shape.max_position_embeddings == sku.max_seq_length
            assert (shape.rope_scaling is not None) == args["use_scaled_rope"]
            assert published.lookup(sku.huggingface_repo) is shape  # llama-models' own hub ids resolve too
        config = shape.config()
        assert config["head_dim"] * config["num_attention_heads"] == config["hidden_size"]
        assert _from_hf(config).params == counts.get(key, counts.get(key.replace(".1", ""))), key
    assert published.SHAPES["llama3.2-1b"].tie_word_embeddings and published.SHAPES["llama3.2-3b"].tie_word_embeddings
    assert not published.SHAPES["llama3.1-8b"].tie_word_embeddings
    assert published.lookup("META-LLAMA/meta-llama-3-8b-instruct") is published.SHAPES["llama3-8b"]
    assert published.lookup("meta-llama/Llama-3.1-8B-Instruct") is published.lookup("meta-llama/Meta-Llama-3.1-8B-Instruct")
    assert published.lookup("someone/Llama-3-8B-finetune") is None
