"""Stage `eval`: measure every variant the build made and write the quality report.

Order of work: tokenize every text once (the base's HF tokenizer); score each full-precision
variant on its own (perplexity, multiple choice, Chinese replies); then the reference and the
quantized variants in lockstep, window by window (perplexity, KL divergence, top-1), in groups that
fit in memory; then the speed of each GGUF. The passes live in `edgezh.eval.passes`, shared with
`edgezh eval` (`edgezh.eval.standalone`).

Outputs: `report.md` and `report/` (PNG figures, `results.json`) in the artifact folder, and the
same copied to the build root (`builds/<name>/report.md`, `builds/<name>/report/`), each written
atomically. The figures also go into the manifest's `info`. Gates are checked last: a failed gate
raises a UserError naming the variant and the figure AFTER both copies are written, so the stage
fails (its `.tmp` folder is removed by the build) while `builds/<name>/report.md` and
`builds/<name>/report/results.json` stay, marked as failing their gates. A failed run also removes
the eval artifact of an earlier run, so the next build evaluates again (and rewrites the root
report) instead of finding an old artifact cached.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from edgezh import layout
from edgezh.artifacts import Artifact, fresh_tmp, swap_in
from edgezh.errors import UserError
from edgezh.eval import chinese_reply, corpora, gates, kld, multiple_choice, passes, plots, report, speed
from edgezh.eval.tokens import EvalTokenizer
from edgezh.eval.variants import Variant, annotate_groups, discover
from edgezh.layout import fingerprint_folder, model_dir
from edgezh.paths import PathResolutionError, resolve_path
from edgezh.progress import status
from edgezh.recipe import EvalConfig

VERSION = "3"  # 2: the size-vs-KLD chart replaces the KLD bars; 3: the importance-matrix and fit sections
log = logging.getLogger("edgezh.eval")

SPEED_PROMPT_TOKENS = 128
SPEED_GEN_TOKENS = 32


def fingerprint(cfg: EvalConfig) -> dict:
    """Identity of the outside files the stage reads (text files, multiple-choice folders)."""
    files = []
    for name in cfg.texts:
        if name not in corpora.BUILTIN:
            try:
                files.append(fingerprint_folder(resolve_path(name, Path.cwd())))
            except (PathResolutionError, OSError):
                files.append({"path": name, "missing": True})
    for spec in cfg.multiple_choice:
        if spec.path is not None:
            folder = Path(spec.path)
            files.append({"path": str(folder), "files": sorted(
                [str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in folder.rglob("*.csv"))}
                if folder.is_dir() else {"path": str(folder), "missing": True})
    return {"files": files}


def run(cfg: EvalConfig, inputs: dict[str, Artifact], out: Path) -> dict:
    root = out.parent
    name = root.name
    template = inputs["base"].info["template"]
    tok = EvalTokenizer(model_dir(inputs["base"]), template)
    data = inputs.get("data")
    notes: list[str] = []

    # ---- everything tokenized once, before any model is loaded (bad inputs fail fast)
    texts, skipped = corpora.load(text_names(cfg, inputs), data, max_chars=cfg.max_tokens * 6 + 1000)
    notes += skipped
    windows, corpus_facts = passes.tokenize_corpora(texts, tok, context_length=cfg.context_length, stride=cfg.stride,
                                                    max_tokens=cfg.max_tokens)
    mc_sets = []
    for spec in cfg.multiple_choice:
        bench = multiple_choice.load(spec)
        for shots in spec.shots:
            mc_sets.append((bench, shots, multiple_choice.prompts(tok, bench, shots, cfg.mc_max_length)))
    reply_prompts, reply_source = _reply_prompts(cfg, data, tok)
    n_ctx = max([cfg.context_length] + [len(p.ids) for _, _, items in mc_sets for p in items]
                + [len(ids) + cfg.reply_max_tokens for ids in reply_prompts])

    variants, reference, variant_notes = discover(inputs, n_ctx=n_ctx)
    annotate_groups(variants)  # imatrix or plain, from each quant's header: the KLD chart's groups
    notes += variant_notes
    results = passes.new_results(name, template, tok, variants, reference, context_length=cfg.context_length,
                                 stride=cfg.stride, max_tokens=cfg.max_tokens, tokenizer=str(model_dir(inputs["base"])),
                                 corpus_facts=corpus_facts, mc_sets=mc_sets, reply_prompts=reply_prompts,
                                 reply_source=reply_source, reply_max_tokens=cfg.reply_max_tokens, notes=notes)
    passes.measure(results, variants, reference, windows, tok, mc_sets=mc_sets, reply_prompts=reply_prompts,
                   reply_max_tokens=cfg.reply_max_tokens)
    measure_speed(results, variants, texts, tok)

    results["gates"] = gates.check(cfg.gates, results)
    failed = gates.failures(results["gates"])
    results["built"] = report.built(inputs)
    if "quantize" in inputs:  # how the quants were made: the importance matrix, the fit search
        results["quantization"] = {"imatrix": inputs["imatrix"].info if "imatrix" in inputs else None,
                                   "fit": inputs["quantize"].info.get("fit")}
    if "adapter" in inputs:  # the adapter GGUF and the bases it was measured on (the report's LoRA adapter line)
        results["adapter"] = {k: inputs["adapter"].info.get(k) for k in
                              ("file", "bytes", "outtype", "alpha", "ranks", "pairs", "bases", "ollama_base")}
    results["ollama"] = report.ollama_commands(inputs, root)
    results["chat"] = f"edgezh chat {_display(root)}"

    write_report(results, out, training_plots=lambda folder: report.copy_training_plots(inputs, folder))
    publish(out, root)
    log.info("report written to %s (%d gate failure(s))", root / "report.md", len(failed))
    if failed:
        _drop_previous(out)
        raise UserError(f"eval gate failed ({len(failed)}): " + "; ".join(failed)
                        + f" — the report is at {root / 'report.md'}")
    return {**{k: results[k] for k in ("perplexity", "kld", "multiple_choice", "chinese_reply", "speed", "gates",
                                       "scoring_tps", "corpora", "method", "notes")},
            "variants": results["variants"], "report": "report.md"}


def text_names(cfg: EvalConfig, inputs: dict[str, Artifact]) -> list[str]:
    """The perplexity corpora: the recipe's, and the held-out text blocks when the build continued pre-training
    (the report shows that perplexity before and after)."""
    extra = [corpora.HELDOUT_TEXT] if "pretrain" in inputs and corpora.HELDOUT_TEXT not in cfg.texts else []
    return [*cfg.texts, *extra]


def write_report(results: dict, out: Path, *, render=None, training_plots=None, results_json: Path | None = None) -> None:
    """`out/report.md` and `out/report/` (figures, and `results.json` unless `results_json` says where):
    the size-vs-KLD chart's points go into `results["kld"]["chart"]` first."""
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    if results.get("kld", {}).get("variants"):
        results["kld"]["chart"] = kld.chart_points(results)
    results["figures"] = plots.draw(results, folder) + (training_plots(folder) if training_plots else [])
    target = results_json or folder / "results.json"
    target.write_text(json.dumps(results, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    (out / "report.md").write_text((render or report.render)(results), encoding="utf-8")


def measure_speed(results: dict, variants: list[Variant], texts, tok) -> None:
    """Prompt and generation tokens/s of every GGUF variant on this machine."""
    prompt = _speed_prompt(texts, tok)
    for variant in variants:
        # a plain twin has its imatrix twin's tensor types, hence its speed: not measured twice
        if variant.engine == "llama.cpp" and prompt and not layout.is_plain_twin(variant.name):
            with status(f"{variant.name}: tokens/s on this machine"):
                adapters = [(Path(variant.facts["adapter_file"]), 1.0)] if variant.facts.get("adapter_file") else []
                results["speed"][variant.name] = speed.measure(Path(variant.facts["file"]), prompt, gen_tokens=SPEED_GEN_TOKENS,
                                                               adapters=adapters)


def _display(root: Path) -> str:
    try:
        return str(root.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(root)


def _reply_prompts(cfg: EvalConfig, data: Artifact | None, tok: EvalTokenizer) -> tuple[list[list[int]], str]:
    if cfg.chinese_reply_prompts == 0:
        return [], "`chinese_reply_prompts` is 0"
    found = chinese_reply.prompts_from_data(data, cfg.chinese_reply_prompts) if data is not None else []
    conversations = found or chinese_reply.prompts_from_hsk(_hsk(), cfg.chinese_reply_prompts)
    return [tok.chat_prompt(c) for c in conversations], chinese_reply.prompt_source(data, len(found))


def _hsk() -> list[dict]:
    from edgezh.data.corpora import hsk_sentences

    return hsk_sentences()


def _speed_prompt(texts, tok: EvalTokenizer) -> list[int]:
    for corpus in texts:
        ids = tok.with_bos(tok.encode(corpus.text[: SPEED_PROMPT_TOKENS * 6]))
        if len(ids) >= SPEED_PROMPT_TOKENS:
            return ids[:SPEED_PROMPT_TOKENS]
    fallback = tok.with_bos(tok.encode("你好，" * SPEED_PROMPT_TOKENS))
    return fallback[:SPEED_PROMPT_TOKENS]


def _drop_previous(out: Path) -> None:
    """Remove the eval artifact of an earlier run, so that the next build evaluates again and rewrites the
    build root's report (otherwise a rerun that matched the earlier artifact's key would be cached and
    leave this failed run's report in place)."""
    previous = out.with_name(out.name.removesuffix(".tmp"))
    if previous != out and previous.is_dir():
        shutil.rmtree(previous)


def publish(out: Path, root: Path) -> None:
    """Copy `out/report.md` and `out/report/` to the build root, each atomically (a reader sees the old
    or the new report, never half of one)."""
    tmp = fresh_tmp(root / "report")
    tmp.rmdir()
    shutil.copytree(out / "report", tmp)
    swap_in(tmp, root / "report")
    part = root / "report.md.part"
    shutil.copyfile(out / "report.md", part)
    os.replace(part, root / "report.md")
