"""Stage `eval`: measure every variant the build made and write the quality report.

Order of work: tokenize every text once (the base's HF tokenizer); score each full-precision
variant on its own (perplexity, multiple choice, Chinese replies); then the reference and the
quantized variants in lockstep, window by window (perplexity, KL divergence, top-1), in groups that
fit in memory; then the speed of each GGUF.

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

from edgezh import __version__
from edgezh.artifacts import Artifact
from edgezh.errors import UserError
from edgezh.eval import chinese_reply, corpora, gates, kld, multiple_choice, perplexity, plots, report, speed
from edgezh.eval.tokens import EvalTokenizer
from edgezh.eval.variants import Variant, batches, discover
from edgezh.models.base_stage import fingerprint_folder, model_dir
from edgezh.paths import PathResolutionError, resolve_path
from edgezh.progress import status
from edgezh.recipe import EvalConfig

VERSION = "1"
log = logging.getLogger("edgezh.eval")

SPEED_PROMPT_TOKENS = 128
SPEED_GEN_TOKENS = 32
MEMORY_SHARE = 0.6  # of available RAM for the weights loaded side by side in the KLD pass


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
    texts, skipped = corpora.load(cfg.texts, data, max_chars=cfg.max_tokens * 6 + 1000)
    notes += skipped
    windows, corpus_facts = {}, {}
    for corpus in texts:
        ids = tok.encode(corpus.text)[: cfg.max_tokens]
        windows[corpus.name] = perplexity.windows(ids, cfg.context_length, cfg.stride, tok.bos_id)
        corpus_facts[corpus.name] = {"source": corpus.source, "tokens": sum(len(w) for w in windows[corpus.name]),
                                     "windows": len(windows[corpus.name])}
    mc_sets = []
    for spec in cfg.multiple_choice:
        bench = multiple_choice.load(spec)
        for shots in spec.shots:
            mc_sets.append((bench, shots, multiple_choice.prompts(tok, bench, shots, cfg.mc_max_length)))
    reply_prompts, reply_source = _reply_prompts(cfg, data, tok)
    n_ctx = max([cfg.context_length] + [len(p.ids) for _, _, items in mc_sets for p in items]
                + [len(ids) + cfg.reply_max_tokens for ids in reply_prompts])

    variants, reference, variant_notes = discover(inputs, n_ctx=n_ctx)
    notes += variant_notes
    by_name = {v.name: v for v in variants}
    results: dict = {
        "name": name, "edgezh": __version__, "template": template,
        "method": {"context_length": cfg.context_length, "stride": cfg.stride, "max_tokens": cfg.max_tokens,
                   "bos": tok.bos_id is not None, "tokenizer": str(model_dir(inputs["base"]))},
        "variants": {v.name: {"engine": v.engine, "quantized": v.quantized, **v.facts} for v in variants},
        "corpora": corpus_facts, "perplexity": {}, "scoring_tps": {},
        "kld": {"reference": reference, "variants": {}},
        "multiple_choice": [{"set": b.name, "layout": b.layout, "shots": k, "questions": len(items), "by_variant": {}}
                            for b, k, items in mc_sets],
        "chinese_reply": {"source": reply_source, "prompts": len(reply_prompts), "max_tokens": cfg.reply_max_tokens,
                          "by_variant": {}},
        "speed": {}, "notes": notes,
    }

    def per_variant(backend, variant: Variant) -> None:
        for entry, (bench, shots, items) in zip(results["multiple_choice"], mc_sets):
            with status(f"{variant.name}: {bench.name} {shots}-shot, {len(items)} questions"):
                preds = multiple_choice.predict(backend, tok, items)
            entry["by_variant"][variant.name] = multiple_choice.summarize(bench, items, preds, shots)
        if reply_prompts:
            with status(f"{variant.name}: greedy replies to {len(reply_prompts)} Chinese prompts"):
                results["chinese_reply"]["by_variant"][variant.name] = chinese_reply.evaluate(
                    backend, tok, reply_prompts, cfg.reply_max_tokens)

    quantized = [v for v in variants if v.quantized]
    lockstep_ref = by_name[reference] if reference and by_name[reference].engine == "llama.cpp" else None
    for variant in variants:
        if variant.quantized or variant is lockstep_ref:
            continue
        with status(f"loading {variant.name} ({variant.engine})"):
            backend = variant.open()
        try:
            _check_vocab(backend, tok, variant)
            results["perplexity"][variant.name] = {}
            for corpus, wins in windows.items():
                with status(f"{variant.name}: perplexity on {corpus} ({corpus_facts[corpus]['tokens']} tokens)"):
                    nll = perplexity.score(backend, wins)
                results["perplexity"][variant.name][corpus] = perplexity.perplexity(nll)
            results["scoring_tps"][variant.name] = _tps(backend)
            per_variant(backend, variant)
        finally:
            backend.close()

    if quantized:
        _lockstep(results, by_name[reference], quantized, windows, corpus_facts, tok, per_variant,
                  run_reference_tasks=lockstep_ref is not None)

    prompt = _speed_prompt(texts, tok)
    for variant in variants:
        if variant.engine == "llama.cpp" and prompt:
            with status(f"{variant.name}: tokens/s on this machine"):
                results["speed"][variant.name] = speed.measure(Path(variant.facts["file"]), prompt, gen_tokens=SPEED_GEN_TOKENS)

    results["gates"] = gates.check(cfg.gates, results)
    failed = gates.failures(results["gates"])
    results["built"] = report.built(inputs)
    results["ollama"] = report.ollama_commands(inputs, root)
    results["chat"] = f"edgezh chat {_display(root)}"

    folder = out / "report"
    folder.mkdir()
    results["figures"] = plots.draw(results, folder) + report.copy_training_plots(inputs, folder)
    (folder / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    (out / "report.md").write_text(report.render(results), encoding="utf-8")
    publish(out, root)
    log.info("report written to %s (%d gate failure(s))", root / "report.md", len(failed))
    if failed:
        _drop_previous(out)
        raise UserError(f"eval gate failed ({len(failed)}): " + "; ".join(failed)
                        + f" — the report is at {root / 'report.md'}")
    return {**{k: results[k] for k in ("perplexity", "kld", "multiple_choice", "chinese_reply", "speed", "gates",
                                       "scoring_tps", "corpora", "method", "notes")},
            "variants": results["variants"], "report": "report.md"}


def _display(root: Path) -> str:
    try:
        return str(root.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(root)


def _check_vocab(backend, tok: EvalTokenizer, variant: Variant) -> None:
    if backend.n_vocab < len(tok):
        raise UserError(f"{variant.name}: the model has {backend.n_vocab} output tokens but the base tokenizer {len(tok)}; "
                        "every variant must share the base's vocabulary")


def _tps(backend) -> float | None:
    return round(backend.tokens / backend.seconds, 1) if backend.seconds else None


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


def _lockstep(results: dict, reference: Variant, quantized: list[Variant], windows: dict, corpus_facts: dict,
              tok: EvalTokenizer, per_variant, *, run_reference_tasks: bool) -> None:
    """The reference and the quantized variants window by window: perplexities, KLD, top-1."""
    import numpy as np
    import psutil

    budget = int(psutil.virtual_memory().available * MEMORY_SHARE)
    groups = batches(reference, quantized, budget)
    if len(groups) > 1:
        results["notes"].append(f"KLD pass in {len(groups)} groups to fit memory; the reference was run once per group")
    table = results["kld"]["variants"]
    for index, group in enumerate(groups):
        with status(f"loading {reference.name} and {', '.join(v.name for v in group)}"):
            ref = reference.open()
            opened = {}
            try:
                for v in group:
                    opened[v.name] = v.open()
            except BaseException:
                ref.close()
                for b in opened.values():
                    b.close()
                raise
        try:
            _check_vocab(ref, tok, reference)
            for v in group:
                _check_vocab(opened[v.name], tok, v)
            pooled = {v.name: ([], []) for v in group}
            for corpus, wins in windows.items():
                with status(f"{reference.name} vs {', '.join(opened)}: {corpus} ({corpus_facts[corpus]['tokens']} tokens)"):
                    ref_nll, comparisons = kld.compare(ref, opened, wins)
                ref_ppl = perplexity.perplexity(ref_nll)
                results["perplexity"].setdefault(reference.name, {})[corpus] = ref_ppl
                for vname, comp in comparisons.items():
                    nll, values, top1 = comp.arrays()
                    ppl = perplexity.perplexity(nll)
                    results["perplexity"].setdefault(vname, {})[corpus] = ppl
                    entry = table.setdefault(vname, {"by_corpus": {}, "ppl_ratio": {}})
                    entry["by_corpus"][corpus] = kld.stats(values, top1)
                    entry["ppl_ratio"][corpus] = ppl / ref_ppl if ref_ppl else None
                    pooled[vname][0].append(values)
                    pooled[vname][1].append(top1)
            for vname, (values, top1) in pooled.items():
                table[vname]["all"] = kld.stats(np.concatenate(values) if values else np.zeros(0),
                                                np.concatenate(top1) if top1 else np.zeros(0, bool))
            if index == 0:
                results["scoring_tps"][reference.name] = _tps(ref)
                if run_reference_tasks:
                    per_variant(ref, reference)
            for v in group:
                results["scoring_tps"][v.name] = _tps(opened[v.name])
                per_variant(opened[v.name], v)
        finally:
            ref.close()
            for b in opened.values():
                b.close()


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
    final = root / "report"
    tmp = root / ".report.tmp"
    old = root / ".report.old"
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    shutil.copytree(out / "report", tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    part = root / "report.md.part"
    shutil.copyfile(out / "report.md", part)
    os.replace(part, root / "report.md")
