"""The measuring passes shared by the `eval` stage and the `edgezh eval` command.

- `tokenize_corpora`: every text tokenized once and cut into perplexity windows;
- `new_results`: the skeleton of the report's results;
- `measure`: all of the below for a list of variants — each full-precision variant alone, then the
  reference with the quantized variants in lockstep, each followed by its multiple-choice sets and
  greedy Chinese replies;
- `score_alone`: one full-precision variant on its own (perplexity, then the caller's per-variant tasks);
- `lockstep`: the reference and the quantized variants window by window (perplexity, KLD, top-1), in
  groups that fit in memory;
- `check_vocab`, `tps`: the vocabulary check before scoring, the scoring throughput after.

`results` is the report's results dict (see `edgezh.eval.eval_stage`); the passes fill its `perplexity`,
`kld.variants`, `scoring_tps` and `notes`.
"""

from __future__ import annotations

from typing import Callable

from edgezh.errors import UserError
from edgezh import __version__
from edgezh.eval import chinese_reply, kld, multiple_choice, perplexity
from edgezh.eval.variants import Variant, batches
from edgezh.progress import status

MEMORY_SHARE = 0.6  # of available RAM for the weights loaded side by side in the KLD pass


def tokenize_corpora(texts, tok, *, context_length: int, stride: int, max_tokens: int) -> tuple[dict, dict]:
    """`{corpus: windows}` and `{corpus: {source, tokens, windows}}` for the report."""
    windows, facts = {}, {}
    for corpus in texts:
        ids = (list(corpus.ids) if corpus.ids is not None else tok.encode(corpus.text))[:max_tokens]
        windows[corpus.name] = perplexity.windows(ids, context_length, stride, tok.bos_id)
        facts[corpus.name] = {"source": corpus.source, "tokens": sum(len(w) for w in windows[corpus.name]),
                              "windows": len(windows[corpus.name])}
    return windows, facts


def new_results(name: str, template: str, tok, variants: list[Variant], reference: str | None, *, context_length: int,
                stride: int, max_tokens: int, tokenizer: str, corpus_facts: dict, mc_sets: list, reply_prompts: list,
                reply_source: str, reply_max_tokens: int, notes: list[str]) -> dict:
    """The results dict every report section reads; the passes fill in the figures."""
    return {
        "name": name, "edgezh": __version__, "template": template,
        "method": {"context_length": context_length, "stride": stride, "max_tokens": max_tokens,
                   "bos": tok.bos_id is not None, "tokenizer": tokenizer},
        "variants": {v.name: {"engine": v.engine, "quantized": v.quantized, **v.facts} for v in variants},
        "corpora": corpus_facts, "perplexity": {}, "scoring_tps": {},
        "kld": {"reference": reference, "variants": {}},
        "multiple_choice": [{"set": b.name, "layout": b.layout, "protocol": b.protocol, "shots": k, "questions": len(items),
                             "by_variant": {}}
                            for b, k, items in mc_sets],
        "chinese_reply": {"source": reply_source, "prompts": len(reply_prompts), "max_tokens": reply_max_tokens,
                          "by_variant": {}},
        "speed": {}, "notes": notes,
    }


def measure(results: dict, variants: list[Variant], reference: str | None, windows: dict, tok, *, mc_sets: list,
            reply_prompts: list[list[int]], reply_max_tokens: int) -> None:
    """Every figure but speed for `variants`: full-precision ones alone, quantized ones in lockstep with `reference`."""
    corpus_facts = results["corpora"]
    by_name = {v.name: v for v in variants}

    def per_variant(backend, variant: Variant) -> None:
        for entry, (bench, shots, items) in zip(results["multiple_choice"], mc_sets):
            with status(f"{variant.name}: {bench.name} {shots}-shot, {len(items)} questions"):
                preds = multiple_choice.predict(backend, tok, items)
            entry["by_variant"][variant.name] = multiple_choice.summarize(bench, items, preds, shots)
        if reply_prompts:
            with status(f"{variant.name}: greedy replies to {len(reply_prompts)} Chinese prompts"):
                results["chinese_reply"]["by_variant"][variant.name] = chinese_reply.evaluate(
                    backend, tok, reply_prompts, reply_max_tokens)

    quantized = [v for v in variants if v.quantized]
    lockstep_ref = by_name[reference] if reference and by_name[reference].engine == "llama.cpp" else None
    for variant in variants:
        if variant.quantized or variant is lockstep_ref:
            continue
        score_alone(results, variant, windows, corpus_facts, tok, per_variant)
    if quantized:
        lockstep(results, by_name[reference], quantized, windows, corpus_facts, tok, per_variant,
                 run_reference_tasks=lockstep_ref is not None)


def check_vocab(backend, tok, variant: Variant) -> None:
    if backend.n_vocab < len(tok):
        raise UserError(f"{variant.name}: the model has {backend.n_vocab} output tokens but the base tokenizer {len(tok)}; "
                        "every variant must share the base's vocabulary")


def tps(backend) -> float | None:
    return round(backend.tokens / backend.seconds, 1) if backend.seconds else None


def score_alone(results: dict, variant: Variant, windows: dict, corpus_facts: dict, tok,
                per_variant: Callable[[object, Variant], None]) -> None:
    """Perplexity of one variant on every corpus, then `per_variant(backend, variant)`."""
    with status(f"loading {variant.name} ({variant.engine})"):
        backend = variant.open()
    try:
        check_vocab(backend, tok, variant)
        results["perplexity"][variant.name] = {}
        for corpus, wins in windows.items():
            with status(f"{variant.name}: perplexity on {corpus} ({corpus_facts[corpus]['tokens']} tokens)"):
                nll = perplexity.score(backend, wins)
            results["perplexity"][variant.name][corpus] = perplexity.perplexity(nll)
        results["scoring_tps"][variant.name] = tps(backend)
        per_variant(backend, variant)
    finally:
        backend.close()


def lockstep(results: dict, reference: Variant, quantized: list[Variant], windows: dict, corpus_facts: dict,
             tok, per_variant: Callable[[object, Variant], None], *, run_reference_tasks: bool) -> None:
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
            check_vocab(ref, tok, reference)
            for v in group:
                check_vocab(opened[v.name], tok, v)
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
                results["scoring_tps"][reference.name] = tps(ref)
                if run_reference_tasks:
                    per_variant(ref, reference)
            for v in group:
                results["scoring_tps"][v.name] = tps(opened[v.name])
                per_variant(opened[v.name], v)
        finally:
            ref.close()
            for b in opened.values():
                b.close()
