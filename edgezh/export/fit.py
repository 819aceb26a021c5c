"""`export.gguf.fit`: the quantization mix with the lowest measured KLD vs f16 that fits a size budget.

1. The budget: a byte count, or a machine (`edgezh.sizes.TARGETS`) less the KV cache of `ctx`
   tokens for this model's shape and a reserve for the OS and runtime.
2. Candidates: every base mix in `fit.candidates` (the IQ ones only with an importance matrix),
   with and without the importance matrix, each plain and with a few per-tensor reallocations
   (`PROMOTIONS`: bits moved from the token embedding — a large share of a small model — to the
   attention values and the FFN down projections, the tensors llama.cpp's own mixes already favour).
   Each is sized exactly with llama.cpp's dry run (nothing written).
3. Of those that fit, the `max_scored` largest are quantized one at a time and scored against the f16
   GGUF on held-out Chinese text: mean KLD per token over the full vocabulary (as llama.cpp's
   `perplexity --kl-divergence`) and top-1 agreement. The reference's log-probabilities are computed
   once and kept (tokens × vocabulary float32: 1 GiB for 2 048 Llama 3 tokens).
4. The lowest KLD wins and is kept as `<name>-fit.gguf`; every candidate's size, bits per weight,
   KLD and top-1 go into the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgezh import layout
from edgezh.artifacts import Artifact
from edgezh.errors import UserError
from edgezh.progress import status
from edgezh.recipe import NEEDS_IMATRIX, GGUFConfig
from edgezh.sizes import human, parse_size, target_budget

# Where a mix's bits go besides llama.cpp's own rules: the token embedding's type (a large share of a small
# model's bytes, and of its head when tied) × the attention values and FFN down projections moved up.
# A type whose block does not divide a tensor's rows (K types need 256) makes that candidate invalid: it
# is dropped when sized, so the same list serves 576-wide SmolLM2 and 4096-wide Llama 3.
EMBEDDINGS = (None, "q4_k", "q5_k", "q4_0", "q5_0")
UPGRADES: dict[str, list[tuple[str, str]]] = {
    "": [],
    "v-q6_k": [(r"attn_v\.weight", "q6_k")],
    "v,down-q6_k": [(r"attn_v\.weight", "q6_k"), (r"ffn_down\.weight", "q6_k")],
    "v,down-q8_0": [(r"attn_v\.weight", "q8_0"), (r"ffn_down\.weight", "q8_0")],
}
PROMOTIONS: dict[str, tuple[str | None, list[tuple[str, str]]]] = {
    "+".join(p for p in ((f"embd-{e}" if e else ""), u) if p): (e, rules) for e in EMBEDDINGS for u, rules in UPGRADES.items()}
MAX_SCORED = 8


@dataclass
class Candidate:
    base: str  # the llama.cpp mix
    imatrix: bool
    promotion: str
    size: dict = field(default_factory=dict)
    score: dict = field(default_factory=dict)
    same_as: str | None = None  # an earlier candidate that gives every tensor the same type
    invalid: str | None = None  # why this model cannot take it (a type whose block does not divide the rows)

    @property
    def label(self) -> str:
        return self.base + ("+imatrix" if self.imatrix else "") + (f" [{self.promotion}]" if self.promotion else "")

    def settings(self, cfg: GGUFConfig) -> dict:
        """`quantize` arguments: the promotion's over the recipe's own per-tensor settings."""
        embd, rules = PROMOTIONS[self.promotion]
        own = [(rule.pattern, rule.type) for rule in cfg.tensor_types]
        return {"tensor_types": (own + rules) or None, "output_type": cfg.output_type,
                "token_embedding_type": embd or cfg.token_embedding_type, "pure": cfg.pure}

    def record(self) -> dict:
        return {"label": self.label, "base": self.base, "imatrix": self.imatrix, "promotion": self.promotion,
                "bytes": self.size.get("bytes"), "bits_per_weight": self.size.get("bits_per_weight"),
                "same_as": self.same_as, **self.score}


def budget(cfg: GGUFConfig, source: Path) -> dict:
    """The byte budget and how it was reckoned."""
    fit = cfg.fit
    if fit.budget is not None:
        return {"budget": parse_size(fit.budget), "given": fit.budget}
    from edgezh.gguf_meta import read_metadata

    keys = ["llama.block_count", "llama.attention.head_count_kv", "llama.attention.head_count", "llama.embedding_length",
            "llama.attention.key_length"]
    meta = read_metadata(source, keys)
    heads = int(meta["llama.attention.head_count"])
    head_dim = int(meta.get("llama.attention.key_length") or int(meta["llama.embedding_length"]) // heads)
    return target_budget(fit.target, layers=int(meta["llama.block_count"]),
                         kv_heads=int(meta.get("llama.attention.head_count_kv") or heads), head_dim=head_dim, ctx=fit.ctx)


def candidates(cfg: GGUFConfig, have_imatrix: bool) -> list[Candidate]:
    found = []
    for base in dict.fromkeys(cfg.fit.candidates):
        for with_matrix in ([True, False] if have_imatrix else [False]):
            if base in NEEDS_IMATRIX and not with_matrix:
                continue
            found += [Candidate(base, with_matrix, promotion) for promotion in PROMOTIONS]
    return found


def held_out_text(inputs: dict[str, Artifact], max_chars: int) -> tuple[str, str]:
    """(text, where it came from): the held-out replies of the data stage, else People's Daily from its end
    (calibration on People's Daily reads from its start)."""
    from edgezh.data import corpora
    from edgezh.eval import corpora as eval_corpora

    if "data" in inputs and inputs["data"].file("eval.jsonl").is_file():
        text = eval_corpora.heldout_text(inputs["data"].file("eval.jsonl"))
        if text:
            return text[:max_chars], "held-out replies (eval.jsonl)"
    text = corpora.peoples_daily()
    return text[-max_chars:], "People's Daily, from the end"


def choose(cfg: GGUFConfig, source: Path, inputs: dict[str, Artifact], out: Path, matrix: dict,
           name: str) -> tuple[dict | None, dict]:
    """Search, score, keep the best as `<name>-fit.gguf`; (its quantize facts or None, the search report)."""
    from edgezh.eval import kld as kld_mod
    from edgezh.eval import perplexity
    from edgezh.eval.backends import GGUFBackend
    from edgezh.eval.tokens import GGUFTokenizer
    from edgezh.export.quantize import dry_run_size, quantize

    limit = budget(cfg, source)
    pool = candidates(cfg, bool(matrix))
    with status(f"fit: sizing {len(pool)} candidate mixes for {human(limit['budget'])}"):
        for c in pool:
            try:
                c.size = dry_run_size(source, c.base, **(matrix if c.imatrix else {}), **c.settings(cfg))
            except UserError as exc:  # a promotion whose type does not fit this model's rows
                c.invalid = str(exc)
    invalid = [c for c in pool if c.invalid]
    pool = [c for c in pool if not c.invalid]
    distinct: dict[tuple, Candidate] = {}
    for c in pool:  # a promotion the mix already makes, or an imatrix on a type that ignores it, is the same file
        same = distinct.setdefault((c.imatrix, tuple(sorted(c.size.pop("tensors").items()))), c)
        if same is not c:
            c.same_as = same.label
    fitting = sorted((c for c in distinct.values() if c.size["bytes"] <= limit["budget"]), key=lambda c: -c.size["bytes"])
    report = {**limit, "text": None, "candidates": [c.record() for c in pool], "chosen": None,
              "invalid": sorted({c.promotion for c in invalid})}
    if not fitting:
        smallest = min(pool, key=lambda c: c.size["bytes"])
        report["note"] = (f"no candidate fits {human(limit['budget'])}: the smallest, {smallest.label}, is "
                          f"{human(smallest.size['bytes'])}; give a larger budget or smaller candidates")
        raise UserError(f"export.gguf.fit: {report['note']}")
    scored = fitting[:cfg.fit.max_scored]

    tok = GGUFTokenizer(source)
    text, where = held_out_text(inputs, max_chars=cfg.fit.tokens * 8)
    ids = tok.encode(text)[:cfg.fit.tokens]
    tok.close()
    n_ctx = 512
    wins = perplexity.windows(ids, n_ctx, n_ctx - (1 if tok.bos_id is not None else 0), tok.bos_id)
    report["text"] = {"source": where, "tokens": sum(len(w) for w in wins)}
    with status(f"fit: f16 reference on {report['text']['tokens']} held-out tokens"):
        with GGUFBackend(source, n_ctx=n_ctx, name="f16") as ref:
            reference = [ref.log_probs(w.ids, w.rows) for w in wins]
    best: tuple[float, Candidate] | None = None
    trial = out / ".fit-trial.gguf"
    keep = out / layout.gguf_name(name, layout.FIT_KIND)
    try:
        for index, c in enumerate(scored, 1):
            with status(f"fit: {index}/{len(scored)} {c.label} ({human(c.size['bytes'])})"):  # status escapes markup
                quantize(source, trial, c.base, **(matrix if c.imatrix else {}), **c.settings(cfg))
                klds, same = [], []
                with GGUFBackend(trial, n_ctx=n_ctx, name=c.label) as backend:
                    for w, ref_lp in zip(wins, reference):
                        k, s = kld_mod.token_kld(ref_lp, backend.log_probs(w.ids, w.rows))
                        klds.append(k)
                        same.append(s)
                stats = kld_mod.stats(np.concatenate(klds), np.concatenate(same))
                c.score = {"kld": stats["mean"], "top1": stats["top1"], "kld_p99": stats["p99"]}
            if best is None or c.score["kld"] < best[0]:
                best = (c.score["kld"], c)
                trial.replace(keep)
    finally:
        trial.unlink(missing_ok=True)
    chosen = best[1]
    report["candidates"] = [c.record() for c in pool]
    report["chosen"] = chosen.record()
    from edgezh.export.quantize import describe

    facts = {**describe(keep, chosen.base), "imatrix": chosen.imatrix, "mix": chosen.label}
    return facts, report
