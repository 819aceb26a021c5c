"""`edgezh eval`: GGUF files (or a build's GGUFs) against a reference, outside a build.

Two sources of models:

- **files**: `A.gguf [B.gguf …] --reference F16.gguf`. Text is tokenized with the reference's own
  vocabulary through llama.cpp (`tokens.GGUFTokenizer`); the chat format comes from the reference's
  embedded template (or `--template`). Every file must carry the reference's vocabulary, token for
  token. Variant names are the file stems.
- **a build**: `builds/<name>`: its quants against its converted GGUF (F16), tokenized with the
  base's HF tokenizer exactly as the build's `eval` stage does; the defaults (texts, windows, token
  budget, reply prompts) are the recipe's `eval` section when it has one.

The measures are the eval stage's own (`edgezh.eval.passes`): perplexity, KL divergence and top-1
agreement in lockstep with the reference, the Chinese-reply rate; no multiple choice, no speed.
Output: `OUT/report.md` (the Perplexity, KL divergence, Chinese-reply rate and Plots sections as the
build's report renders them), `OUT/report/*.png` and `OUT/results.json`, written into `OUT.tmp` and
swapped in whole.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgezh.artifacts import Artifact, fresh_tmp, swap_in
from edgezh.errors import UserError
from edgezh.eval import chinese_reply, corpora, passes, report
from edgezh.eval.variants import Variant, annotate_groups, discover, gguf_variant
from edgezh.gguf_meta import read_metadata
from edgezh.recipe import EvalConfig

CORPUS_ALIASES = {"peoples_daily": "peoples-daily", "peoples-daily": "peoples-daily", "hsk": "hsk", "heldout": "heldout"}
OUT_NAME = "eval-report"


@dataclass
class Options:
    """What the command line may change; None: the recipe's value (a build) or EvalConfig's default."""

    texts: list[str] = field(default_factory=list)  # corpus names (hsk, peoples-daily, heldout) or files
    max_tokens: int | None = None
    context_length: int | None = None
    stride: int | None = None
    prompts: Path | None = None
    replies: int | None = None  # how many prompts for the Chinese-reply rate (0: not measured)
    reply_max_tokens: int | None = None
    template: str | None = None
    threads: int | None = None
    command: str | None = None  # shown in the report


def corpus_name(value: str) -> str:
    return CORPUS_ALIASES.get(value, value)


def _config(base: dict, opts: Options) -> EvalConfig:
    changes = {"texts": opts.texts or None, "max_tokens": opts.max_tokens, "context_length": opts.context_length,
               "stride": opts.stride, "chinese_reply_prompts": opts.replies, "reply_max_tokens": opts.reply_max_tokens}
    data = {**base, **{k: v for k, v in changes.items() if v is not None}, "multiple_choice": [], "gates": {}}
    try:
        return EvalConfig.model_validate(data)
    except ValueError as exc:  # pydantic's ValidationError
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}" for e in exc.errors())
        raise UserError(f"eval options: {problems}") from None


# ------------------------------------------------------------------ checking the files


def check_gguf(path: Path, what: str = "GGUF file") -> Path:
    """A readable, whole GGUF file, or a UserError naming the path."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such {what}")
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a GGUF file (a build folder is evaluated alone: edgezh eval builds/<name>)")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (starts with {magic!r})")
    read_metadata(path, [], check_data=True)  # truncated or corrupt: a UserError naming the path
    return path


def vocabulary(path: Path) -> list[str]:
    tokens = read_metadata(path, ["tokenizer.ggml.tokens"]).get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise UserError(f"{path}: the GGUF has no vocabulary (tokenizer.ggml.tokens)")
    return tokens


def check_same_vocabulary(path: Path, reference: Path, ref_tokens: list[str]) -> None:
    tokens = vocabulary(path)
    if tokens == ref_tokens:
        return
    if len(tokens) != len(ref_tokens):
        raise UserError(f"{path}: its vocabulary has {len(tokens)} tokens, the reference {reference} has {len(ref_tokens)}; "
                        "KL divergence compares models over one vocabulary")
    first = next(i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b)
    raise UserError(f"{path}: its vocabulary differs from the reference {reference} at token {first} "
                    f"({tokens[first]!r} vs {ref_tokens[first]!r}); KL divergence compares models over one vocabulary")


def _names(paths: list[Path]) -> list[str]:
    """Variant names: file stems, made unique with the parent folder when two files share a stem."""
    stems = [p.name.removesuffix(".gguf") for p in paths]
    return [f"{p.parent.name}/{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]


# ------------------------------------------------------------------ the two sources


@dataclass
class Source:
    name: str
    template: str
    tok: Any
    tokenizer: str  # what tokenized, for the report
    cfg: EvalConfig
    data: Artifact | None
    variants: list[Variant]
    reference: str
    make: Any  # (n_ctx) -> list[Variant]
    notes: list[str] = field(default_factory=list)
    tokenized_with: str | None = None  # for the report's method line, when not the base's HF tokenizer


def from_files(models: list[Path], reference: Path, opts: Options) -> Source:
    from edgezh.eval.tokens import GGUFTokenizer
    from edgezh.layout import quant_stem

    reference = check_gguf(Path(reference), "reference GGUF")
    models = [check_gguf(Path(m)) for m in models]
    models = [m for m in models if m.resolve() != reference.resolve()]
    if not models:
        raise UserError("nothing to compare: give at least one GGUF besides the reference")
    ref_tokens = vocabulary(reference)
    for m in models:
        check_same_vocabulary(m, reference, ref_tokens)
    names = _names([reference, *models])
    tok = GGUFTokenizer(reference, opts.template)
    cfg = _config(EvalConfig(texts=["hsk"]).model_dump(mode="json"), opts)

    def make(n_ctx: int) -> list[Variant]:
        return ([gguf_variant(reference, names[0], n_ctx=n_ctx, quantized=False, threads=opts.threads)]
                + [gguf_variant(m, n, n_ctx=n_ctx, quantized=True, threads=opts.threads) for m, n in zip(models, names[1:])])

    return Source(quant_stem(reference), tok.template, tok, f"{reference.name} (llama.cpp vocabulary)", cfg, None, [],
                  names[0], make, tokenized_with=f"the reference's own vocabulary (`{reference.name}`, llama.cpp)")


def _build_inputs(build: Path) -> tuple[dict[str, Artifact], dict]:
    from edgezh.layout import build_artifacts

    return build_artifacts(build, ("base", "data", "gguf", "quantize"))


def from_build(build: Path, opts: Options) -> Source:
    from edgezh.eval.tokens import EvalTokenizer
    from edgezh.layout import model_dir

    inputs, manifest = _build_inputs(build)
    if "base" not in inputs:
        raise UserError(f"{build}: the build has no base stage yet; run edgezh build first")
    if "gguf" not in inputs or "quantize" not in inputs:
        raise UserError(f"{build}: the build has no quantized GGUF to compare (export.gguf.quantize in the recipe); "
                        "run edgezh build, or pass .gguf files with --reference")
    recipe_eval = (manifest.get("recipe") or {}).get("eval") or {}
    base_cfg = dict(recipe_eval) if recipe_eval else EvalConfig(texts=["heldout" if "data" in inputs else "hsk"]).model_dump(mode="json")
    cfg = _config(base_cfg, opts)
    template = opts.template or inputs["base"].info["template"]
    tok = EvalTokenizer(model_dir(inputs["base"]), template)
    gguf_inputs = {k: v for k, v in inputs.items() if k in ("base", "gguf", "quantize")}

    def make(n_ctx: int) -> list[Variant]:
        variants, reference, _notes = discover(gguf_inputs, n_ctx=n_ctx, threads=opts.threads)
        variants = [v for v in variants if v.engine == "llama.cpp"]
        annotate_groups(variants)
        if reference not in {v.name for v in variants}:
            raise UserError(f"{build}: its converted GGUF is {reference!r}, not an unquantized reference")
        for v in variants:
            if v.facts.get("file") and not Path(v.facts["file"]).is_file():
                raise UserError(f"{v.facts['file']}: listed in the build's manifest but missing; rerun edgezh build")
        return variants

    source = Source(manifest.get("name") or build.name, template, tok, str(model_dir(inputs["base"])), cfg,
                    inputs.get("data"), [], "", make)
    return source


# ------------------------------------------------------------------ the run


def _reply_prompts(cfg: EvalConfig, opts: Options, data: Artifact | None, tok) -> tuple[list[list[int]], str]:
    if cfg.chinese_reply_prompts == 0:
        return [], "`--replies 0`"
    if opts.prompts is not None:
        conversations = chinese_reply.prompts_from_file(Path(opts.prompts), cfg.chinese_reply_prompts)
        return [tok.chat_prompt(c) for c in conversations], f"first user turns of {opts.prompts}"
    found = chinese_reply.prompts_from_data(data, cfg.chinese_reply_prompts) if data is not None else []
    if not found:
        from edgezh.data.corpora import hsk_sentences

        found_hsk = chinese_reply.prompts_from_hsk(hsk_sentences(), cfg.chinese_reply_prompts)
        return [tok.chat_prompt(c) for c in found_hsk], chinese_reply.prompt_source(data, 0)
    return [tok.chat_prompt(c) for c in found], chinese_reply.prompt_source(data, len(found))


def evaluate(source: Source, opts: Options) -> dict:
    """Measure the source's GGUFs; the results dict the report renders."""
    cfg, tok = source.cfg, source.tok
    notes = list(source.notes)
    names = [corpus_name(t) for t in cfg.texts]
    texts, skipped = corpora.load(names, source.data, max_chars=cfg.max_tokens * 6 + 1000)
    notes += skipped
    if not texts:
        raise UserError("no text to measure perplexity on: " + "; ".join(skipped) + " (pass --corpus hsk or --text FILE)")
    windows, corpus_facts = passes.tokenize_corpora(texts, tok, context_length=cfg.context_length, stride=cfg.stride,
                                                    max_tokens=cfg.max_tokens)
    if not any(windows.values()):
        raise UserError(f"the texts ({', '.join(names)}) give no tokens to score")
    reply_prompts, reply_source = _reply_prompts(cfg, opts, source.data, tok)
    n_ctx = max([cfg.context_length] + [len(ids) + cfg.reply_max_tokens for ids in reply_prompts])
    variants = source.make(n_ctx)
    reference = source.reference or next(v.name for v in variants if not v.quantized)
    results = passes.new_results(source.name, source.template, tok, variants, reference, context_length=cfg.context_length,
                                 stride=cfg.stride, max_tokens=cfg.max_tokens, tokenizer=source.tokenizer,
                                 corpus_facts=corpus_facts, mc_sets=[], reply_prompts=reply_prompts,
                                 reply_source=reply_source, reply_max_tokens=cfg.reply_max_tokens, notes=notes)
    if source.tokenized_with:
        results["method"]["tokenized_with"] = source.tokenized_with
    if opts.command:
        results["command"] = opts.command
    passes.measure(results, variants, reference, windows, tok, mc_sets=[], reply_prompts=reply_prompts,
                   reply_max_tokens=cfg.reply_max_tokens)
    return results


def write(results: dict, out: Path) -> Path:
    """`out/report.md`, `out/report/` and `out/results.json`, replacing an earlier `edgezh eval` output whole."""
    from edgezh.eval.eval_stage import write_report

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "results.json").is_file())):
        raise UserError(f"{out}: exists and is not an edgezh eval output; choose another -o")
    tmp = fresh_tmp(out)
    try:
        write_report(results, tmp, render=report.render_eval, results_json=tmp / "results.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, out)
    return out


def run(models: list[Path], reference: Path | None, opts: Options, out: Path | None = None) -> tuple[dict, Path]:
    """`edgezh eval`: one build folder alone, or GGUF files with a reference. Returns the results and OUT."""
    if reference is None:
        if len(models) != 1 or not Path(models[0]).is_dir():
            missing = next((m for m in models if not Path(m).exists()), None)
            if missing is not None:
                raise UserError(f"{missing}: no such GGUF file or build folder")
            raise UserError("--reference F16.gguf is needed to compare GGUF files (or pass one build folder: builds/<name>)")
        build = Path(models[0])
        source = from_build(build, opts)
        out = Path(out) if out is not None else build / OUT_NAME
    else:
        if any(Path(m).is_dir() for m in models):
            folder = next(m for m in models if Path(m).is_dir())
            raise UserError(f"{folder}: a folder; with --reference every model is a .gguf file "
                            "(a build is evaluated alone: edgezh eval builds/<name>)")
        source = from_files([Path(m) for m in models], Path(reference), opts)
        out = Path(out) if out is not None else Path.cwd() / OUT_NAME
    try:
        results = evaluate(source, opts)
    finally:
        if hasattr(source.tok, "close"):
            source.tok.close()
    return results, write(results, out)
