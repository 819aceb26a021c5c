"""`report.md`: one page a person reads top-down, built from the eval stage's results.

Layout: title and gate verdict; what was built (stages, hashes, files with sizes and bits per
weight, the recipe sections); perplexity; KL divergence and top-1 agreement; multiple choice by
category; Chinese-reply rate; speed on this machine; plots and training curves; gates; how to run
it (Ollama commands, `edgezh chat`); notes. Figures sit in `report/` beside it.

`render_eval` is the page `edgezh eval` writes: the files, then the same Perplexity, KL divergence,
Chinese-reply rate and Plots sections.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from edgezh.artifacts import MANIFEST, Artifact
from edgezh.eval.categories import CATEGORIES, CHINA_SPECIFIC

SECTIONS = ("What was built", "Perplexity", "KL divergence", "Multiple choice", "Chinese-reply rate",
            "Speed on this machine", "Plots", "Training curves", "Gates", "Run it")
_INFO_FIRST = ("template", "source", "method", "dtype", "params", "outtype", "file", "bytes", "bits", "group_size")
_INFO_SKIP = {"exports", "model_path", "quants", "models", "f16_fallback", "stop_ids", "fallback", "tensor_types"}


def built(inputs: dict[str, Artifact]) -> list[dict]:
    """One row per input stage: folder, hash, the recipe section it ran with, a few facts."""
    rows = []
    for name, artifact in inputs.items():
        manifest = {}
        try:
            manifest = json.loads((artifact.path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        keys = [k for k in _INFO_FIRST if k in artifact.info] + sorted(k for k in artifact.info if k not in _INFO_FIRST)
        facts = {k: artifact.info[k] for k in keys if k not in _INFO_SKIP and isinstance(artifact.info[k], (str, int, float, bool))}
        rows.append({"stage": name, "folder": artifact.path.name, "hash": artifact.hash, "config": manifest.get("config"),
                     "wall_s": manifest.get("wall_s"), "facts": facts,
                     "bytes": sum((artifact.path / rel).stat().st_size for rel in artifact.files if (artifact.path / rel).is_file())})
    return rows


def ollama_commands(inputs: dict[str, Artifact], root: Path) -> list[list[str]]:
    from edgezh.export.modelfile import commands

    if "modelfile" not in inputs:
        return []
    return [commands(root / "export", model, kind) for kind, model in inputs["modelfile"].info.get("models", {}).items()]


def copy_training_plots(inputs: dict[str, Artifact], folder: Path) -> list[str]:
    """The PNG plots the training stages wrote, copied as `report/<stage>-<file>.png`."""
    copied = []
    for stage in ("pretrain", "sft", "dpo"):
        if stage not in inputs:
            continue
        for png in sorted(inputs[stage].path.rglob("*.png")):
            name = f"{stage}-{png.name}"
            shutil.copyfile(png, folder / name)
            copied.append(f"{folder.name}/{name}")
    return copied


# ------------------------------------------------------------------ rendering


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:,.1f} MiB"


def _num(x, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render(r: dict) -> str:
    lines: list[str] = [f"# {r['name']}: quality report", ""]
    failed = [g for g in r.get("gates", []) if not g["passed"]]
    if failed:
        lines += [f"**Gates: FAILED** ({len(failed)}): " + "; ".join(g["message"] for g in failed), ""]
    elif r.get("gates"):
        lines += ["**Gates: passed** (" + ", ".join(sorted({g["gate"] for g in r["gates"]})) + ")", ""]
    lines += [f"edgezh {r['edgezh']}, chat format `{r['template']}`, {time.strftime('%Y-%m-%d %H:%M')}. "
              f"Chat with it: `{r['chat']}`", ""]
    lines += _built(r) + _perplexity(r) + _kld(r) + _mc(r) + _replies(r) + _speed(r) + _plots(r) + _gates(r) + _run(r)
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(lines).rstrip() + "\n"


def render_eval(r: dict) -> str:
    """The report of `edgezh eval` (GGUF files, or a build's GGUFs, against a reference): the files, then the
    Perplexity, KL divergence, Chinese-reply rate and Plots sections exactly as the build's report renders them."""
    lines: list[str] = [f"# {r['name']}: quality of {len(r['variants'])} GGUF file(s)", ""]
    lines += [f"edgezh {r['edgezh']}, chat format `{r['template']}`, tokenized with `{r['method']['tokenizer']}`, "
              f"{time.strftime('%Y-%m-%d %H:%M')}." + (f" Command: `{r['command']}`" if r.get("command") else ""), ""]
    lines += ["## Files", ""] + _variants(r)
    lines += _perplexity(r) + _kld(r) + _replies(r) + _plots(r, training_curves=False)
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(lines).rstrip() + "\n"


def _built(r: dict) -> list[str]:
    lines = ["## What was built", ""]
    rows = []
    for b in r.get("built", []):
        facts = ", ".join(f"{k}={v}" for k, v in list(b["facts"].items())[:6])
        rows.append([b["stage"], f"`{b['folder']}`", f"`{b['hash'][:12]}`", _mib(b["bytes"]), facts])
    lines += _table(["stage", "folder", "hash", "size", "facts"], rows) + [""]
    lines += ["Variants evaluated (each row a model the build made):", ""] + _variants(r)
    recipe = {b["stage"]: b["config"] for b in r.get("built", []) if b.get("config") is not None}
    if recipe:
        lines += ["<details><summary>Recipe sections each stage ran with (from its manifest)</summary>", "", "```json",
                  json.dumps(recipe, indent=1, ensure_ascii=False), "```", "", "</details>", ""]
    return lines


def _variants(r: dict) -> list[str]:
    files = [[name, v["engine"], f"`{Path(v.get('file') or v.get('folder') or v.get('adapter') or '').name}`"
              + (f" + `{Path(v['adapter_file']).name}`" if v.get("adapter_file") else ""),
              _mib(v.get("bytes")), _num(v.get("bits_per_weight") or v.get("bits"), "g") if (v.get("bits_per_weight") or v.get("bits")) else "—"]
             for name, v in r["variants"].items()]
    return _table(["variant", "engine", "file / folder", "size", "bits per weight"], files) + [""]


def _perplexity(r: dict) -> list[str]:
    m = r["method"]
    lines = ["## Perplexity", ""]
    corpora = list(r.get("corpora", {}))
    if not corpora or not r.get("perplexity"):
        return lines + ["No perplexity corpus was available (see Notes).", ""]
    lines += [f"Sliding windows of {m['context_length']} tokens{' (BOS first)' if m['bos'] else ''}, stride {m['stride']}: "
              "each window scores only the tokens the previous one did not reach, so every token is scored once "
              f"with at least {m['context_length'] - int(m['bos']) - m['stride']} tokens of context after the first window. "
              + (f"Texts are tokenized once with {m['tokenized_with']}; every model reads the same ids (llama.cpp, F32 KV "
                 "cache). " if m.get("tokenized_with") else "Texts are tokenized once with the base's tokenizer; transformers "
                 "and llama.cpp (F32 KV cache) read the same ids. ") + "Lower is better.", ""]
    header = ["variant", "engine"] + [f"{c} ({r['corpora'][c]['tokens']} tokens)" for c in corpora]
    rows = [[name, r["variants"][name]["engine"]] + [_num(values.get(c), ",.3f") for c in corpora]
            for name, values in r["perplexity"].items()]
    lines += _table(header, rows) + [""]
    lines += ["Sources: " + "; ".join(f"`{c}`: {r['corpora'][c]['source']}" for c in corpora), ""]
    return lines + _pretrained(r)


def _pretrained(r: dict) -> list[str]:
    """Continued pre-training: the held-out text's perplexity before (base) and after (pretrain, then each later variant)."""
    ppl = r.get("perplexity") or {}
    corpus = "heldout-text"
    if "pretrain" not in ppl or ppl.get("base", {}).get(corpus) is None or ppl["pretrain"].get(corpus) is None:
        return []
    steps = [f"base {ppl['base'][corpus]:,.3f}"] + [f"{name} {values[corpus]:,.3f}" for name, values in ppl.items()
                                                   if name != "base" and values.get(corpus) is not None
                                                   and not r["variants"].get(name, {}).get("quantized")]
    change = ppl["pretrain"][corpus] / ppl["base"][corpus] - 1
    return [f"Continued pre-training: perplexity on the held-out text (`{corpus}`) {' → '.join(steps)} "
            f"({change:+.1%} after pretrain vs the base).", ""]


def _kld(r: dict) -> list[str]:
    k = r.get("kld") or {}
    lines = ["## KL divergence and top-1 agreement", ""]
    if not k.get("variants"):
        return lines + ["No quantized variant in this build: nothing to compare.", ""]
    lines += [f"Each quantized variant against `{k['reference']}`, token by token over the full vocabulary on the "
              "perplexity tokens (as llama.cpp's `perplexity --kl-divergence`): KLD in nats per token; top-1 = share of "
              "tokens whose most likely next token is the same. Perplexity ratio: worst corpus.", ""]
    rows = []
    for name, v in k["variants"].items():
        a = v.get("all", {})
        ratio = max((x for x in v.get("ppl_ratio", {}).values() if x is not None), default=None)
        bpw = r["variants"][name].get("bits_per_weight") or r["variants"][name].get("bits")
        rows.append([name, _mib(r["variants"][name].get("bytes")) or "—", _num(bpw, "g") if bpw else "—",
                     _num(a.get("mean"), ".5f"), _num(a.get("p99"), ".5f"), _num(a.get("max"), ".4f"), _num(a.get("top1"), ".2%"),
                     _num(ratio, ".4f"), str(a.get("tokens", 0))])
    lines += _table(["variant", "size", "bits per weight", "mean KLD", "p99 KLD", "max KLD", "top-1", "PPL ratio", "tokens"],
                    rows) + [""]
    front = [p["variant"] for p in (k.get("chart") or {}).get("points", []) if p.get("pareto")]
    if front:
        lines += [f"Pareto front of size against mean KLD (no other variant is both smaller and closer to `{k['reference']}`), "
                  f"smallest first: {', '.join(front)}. The chart is under Plots.", ""]
    return lines + _imatrix(r) + _fit(r) + _adapter(r)


def _imatrix(r: dict) -> list[str]:
    """Each type built both ways: with the build's importance matrix and without (`<type>-plain`)."""
    q = (r.get("quantization") or {})
    matrix = q.get("imatrix")
    k = (r.get("kld") or {}).get("variants") or {}
    pairs = [(name, name.removesuffix("-plain")) for name in k if name.endswith("-plain") and name.removesuffix("-plain") in k]
    if not matrix:
        return []
    source = ", ".join(matrix.get("datasets") or []) or matrix.get("source", "a file")
    lines = ["### Importance matrix", "",
             f"Quantized with `{matrix['file']}`: {matrix.get('chunk_count')} chunks of {matrix.get('chunk_size')} tokens "
             f"of {source}, {matrix.get('entries')} weights.", ""]
    if not pairs:
        return lines + ["No type was also built without it (`export.gguf.plain`), so there is nothing to compare.", ""]
    rows = []
    for plain, with_matrix in pairs:
        a, b = k[plain].get("all", {}), k[with_matrix].get("all", {})
        ratio = b["mean"] / a["mean"] if a.get("mean") and b.get("mean") is not None else None
        rows.append([with_matrix, _num(a.get("mean"), ".5f"), _num(b.get("mean"), ".5f"), _num(ratio, ".2f") + "×" if ratio else "—",
                     f"{_num(a.get('top1'), '.1%')} → {_num(b.get('top1'), '.1%')}"])
    return lines + _table(["type", "mean KLD plain", "mean KLD imatrix", "imatrix / plain", "top-1 plain → imatrix"], rows) + [""]


def _fit(r: dict) -> list[str]:
    """`export.gguf.fit`: the budget, every scored candidate, the one kept."""
    fit = (r.get("quantization") or {}).get("fit")
    if not fit:
        return []
    reckoned = (f"{fit['target']}: {_mib(fit['memory'])} less {_mib(fit['reserve'])} reserve and {_mib(fit['kv_cache'])} "
                f"of KV cache for {fit['ctx']} tokens" if fit.get("target") else f"given as {fit.get('given')}")
    chosen = fit.get("chosen") or {}
    lines = ["### Fit to a size budget", "",
             f"Budget {_mib(fit['budget'])} ({reckoned}). {len(fit['candidates'])} candidate mixes sized by llama.cpp's dry run; "
             f"the largest that fit scored by mean KLD vs f16 on {fit['text']['tokens']} tokens of {fit['text']['source']}. "
             f"Kept as `fit`: **{chosen.get('label')}**.", ""]
    rows = [[c["label"], _mib(c["bytes"]), _num(c.get("bits_per_weight"), "g"), _num(c["kld"], ".5f"), _num(c.get("top1"), ".1%")]
            for c in sorted(fit["candidates"], key=lambda c: c["bytes"]) if c.get("kld") is not None]
    return lines + _table(["candidate", "size", "bits per weight", "mean KLD (held-out)", "top-1"], rows) + [""]


def _adapter(r: dict) -> list[str]:
    """`export.adapter`: the LoRA adapter GGUF on each base GGUF in llama.cpp against the reference (the merged model),
    beside the merged model's quant of the same type (its plain twin first: quantized the same way as the base)."""
    a = r.get("adapter")
    k = r.get("kld") or {}
    if not a or not k.get("variants"):
        return []
    by_kind = {v["base_kind"]: name for name, v in r["variants"].items() if v.get("base_kind")}
    lines = ["### LoRA adapter on the base", "",
             f"`{a['file']}` ({_mib(a['bytes'])}: {a['pairs']} lora_a/lora_b pairs, rank {', '.join(map(str, a['ranks']))}, "
             f"alpha {a['alpha']:g}) put on the base GGUFs by llama.cpp (`--lora`), against `{k['reference']}`, the merged "
             "model, on the same tokens: what shipping the adapter alone gives a user who has the base. Beside it, the "
             "merged model quantized to the same type.", ""]
    rows = []
    for kind, name in by_kind.items():
        s = (k["variants"].get(name) or {}).get("all") or {}
        twin = next((t for t in (f"{kind}-plain", kind) if t in k["variants"]), None)
        merged = ("— (the reference)" if kind == k["reference"] else
                  f"`{twin}`: {_num(k['variants'][twin]['all'].get('mean'), '.5f')}, {_num(k['variants'][twin]['all'].get('top1'), '.2%')}"
                  if twin else "—")
        size = f"{_mib((a['bases'].get(kind) or {}).get('bytes'))} + {_mib(a['bytes'])}"
        rows.append([name, size, _num(s.get("mean"), ".2e"), _num(s.get("p99"), ".2e"), _num(s.get("top1"), ".2%"),
                     str(s.get("tokens", 0)), merged])
    lines += _table(["base + adapter", "base + adapter size", "mean KLD", "p99 KLD", "top-1", "tokens",
                     "merged, same type: mean KLD, top-1"], rows) + [""]
    if a.get("ollama_base"):
        lines += [f"`Modelfile.lora` puts the adapter on the Ollama model `{a['ollama_base']}`, which this report cannot "
                  "measure; the rows above use edgezh's own base GGUFs.", ""]
    return lines


def _mc(r: dict) -> list[str]:
    lines = ["## Multiple choice", ""]
    if not r.get("multiple_choice"):
        return lines + ["No multiple-choice set in the recipe (`eval.multiple_choice`).", ""]
    lines += ["Scored by the log-likelihood of the answer letter (A–D) after the prompt; categories are the mean of their "
              "subjects' accuracies, overall the mean over subjects. Chance is 25%. Each heading names its protocol: "
              "*official* is the C-Eval/CMMLU scripts' prompt (the letter as the next token), *lm-eval* lm-evaluation-harness's "
              "`ceval-valid` / `cmmlu` prompt (` A`…` D` after `答案：`), whose figures compare with published lm-eval tables.", ""]
    for entry in r["multiple_choice"]:
        variants = entry["by_variant"]
        groups = []
        for summary in variants.values():
            for g in summary["groups"]:
                if g not in groups:
                    groups.append(g)
        order = [g for g in (*CATEGORIES, "Hard", CHINA_SPECIFIC) if g in groups] + [g for g in groups if g not in (*CATEGORIES, "Hard", CHINA_SPECIFIC)]
        protocol = "" if entry["layout"] == "builtin" else f", {entry.get('protocol', 'official')} protocol"
        lines += [f"### {entry['set']}, {entry['shots']}-shot{protocol} ({entry['questions']} questions)", ""]
        if entry["layout"] == "builtin":
            subjects = list(next(iter(variants.values()))["subjects"]) if variants else []
            rows = [[name, _num(s["overall"], ".1%")] + [_num(s["subjects"][x]["accuracy"], ".1%") for x in subjects]
                    for name, s in variants.items()]
            lines += _table(["variant", "overall"] + subjects, rows) + [""]
        else:
            rows = [[name, _num(s["overall"], ".1%")] + [_num(s["groups"].get(g), ".1%") for g in order] for name, s in variants.items()]
            lines += _table(["variant", "overall"] + order, rows) + [""]
        dropped = max((s.get("fewer_shots", 0) for s in variants.values()), default=0)
        if dropped:
            lines += [f"{dropped} prompt(s) lost examples to fit `mc_max_length`.", ""]
    return lines


def _replies(r: dict) -> list[str]:
    c = r.get("chinese_reply") or {}
    lines = ["## Chinese-reply rate", ""]
    if not c.get("by_variant"):
        return lines + [f"Not measured: {c.get('source', 'no prompts')}.", ""]
    lines += [f"{c['prompts']} prompts ({c['source']}), greedy replies of at most {c.get('max_tokens', '?')} tokens; a reply "
              "counts as Chinese when more than half of its units are CJK ideographs (a unit: one ideograph, or one run of "
              "other letters and digits such as an English word).", ""]
    rows = [[name, _num(v["rate"], ".1%"), _num(v["mean_cjk_share"], ".2f"),
             (v["examples"][0][:60].replace("|", "\\|").replace("\n", " ") if v["examples"] else "")]
            for name, v in c["by_variant"].items()]
    return lines + _table(["variant", "Chinese replies", "mean CJK share", "first reply"], rows) + [""]


def _speed(r: dict) -> list[str]:
    lines = ["## Speed on this machine", ""]
    if r.get("speed"):
        first = next(iter(r["speed"].values()))
        lines += [f"llama.cpp with its default settings (F16 KV cache), {first['threads']} thread(s) of {first['cpu_count']} cores: "
                  f"a {first['prompt_tokens']}-token prompt, then {first['gen_tokens']} generated tokens. One run: indicative.", ""]
        rows = [[name, _num(v["prompt_tps"], ",.1f"), _num(v["gen_tps"], ",.1f")] for name, v in r["speed"].items()]
        lines += _table(["GGUF", "prompt tokens/s", "generation tokens/s"], rows) + [""]
    else:
        lines += ["No GGUF in this build.", ""]
    if r.get("scoring_tps"):
        lines += ["Evaluation throughput (tokens read per second while scoring, this report's settings):", ""]
        lines += _table(["variant", "tokens/s"], [[n, _num(v, ",.1f")] for n, v in r["scoring_tps"].items()]) + [""]
    return lines


def _plots(r: dict, *, training_curves: bool = True) -> list[str]:
    figures = r.get("figures", [])
    ours = [f for f in figures if Path(f).name in ("perplexity.png", "kld.png")]
    training = [f for f in figures if f not in ours]
    lines = ["## Plots", ""] + [f"![{Path(f).stem}]({f})" for f in ours] + [""]
    if not training_curves:
        return lines
    lines += ["## Training curves", ""]
    lines += [f"![{Path(f).stem}]({f})" for f in training] if training else ["No training plots in this build."]
    return lines + [""]


def _gates(r: dict) -> list[str]:
    lines = ["## Gates", ""]
    if not r.get("gates"):
        return lines + ["No gates in the recipe (`eval.gates`).", ""]
    rows = [[g["gate"], g["variant"], _num(g["value"], ".6g"), format(g["limit"], "g"), "pass" if g["passed"] else "**FAIL**"]
            for g in r["gates"]]
    return lines + _table(["gate", "variant", "value", "limit", "result"], rows) + [""]


def _run(r: dict) -> list[str]:
    lines = ["## Run it", ""]
    if r.get("ollama"):
        lines += ["With Ollama:", "", "```bash"] + [line for pair in r["ollama"] for line in pair] + ["```", ""]
    else:
        lines += ["No Modelfiles in this build (add a `modelfile` section for Ollama).", ""]
    lines += ["In the terminal chat:", "", "```bash", r["chat"], "```", ""]
    return lines
