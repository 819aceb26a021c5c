"""`edgezh eval`: perplexity, KL divergence, top-1 and the Chinese-reply rate of GGUF files against a
reference (or of a build's GGUFs against its F16), written as the report's sections on their own.

    edgezh eval A.gguf [B.gguf …] --reference F16.gguf [--text FILE | --corpus hsk|peoples_daily] [--tokens N]
                [--prompts FILE.jsonl] [-o OUT_DIR]
    edgezh eval builds/<name>

The work is `edgezh.eval.standalone`; this module is the arguments and the table printed at the end.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from edgezh.progress import out


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """The `eval` subcommand on an argparse subparsers object."""
    p = sub.add_parser("eval", help="measure GGUF files against a reference (perplexity, KLD, top-1, Chinese replies)",
                       description="Evaluate GGUF files against a reference GGUF, or a build's GGUFs against its F16: "
                       "perplexity, KL divergence and top-1 agreement on a text, and the Chinese-reply rate. Writes "
                       "OUT_DIR/report.md (the build report's sections), OUT_DIR/report/*.png and OUT_DIR/results.json.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="GGUF files (with --reference), or one build folder (builds/<name>)")
    p.add_argument("--reference", metavar="F16.gguf", help="the unquantized GGUF to compare against (a build: its own F16)")
    p.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="UTF-8 text for perplexity and KLD: a file or pkg://PACKAGE/FILE (repeatable)")
    p.add_argument("--corpus", action="append", default=[], choices=["hsk", "peoples_daily", "heldout"],
                   help="a built-in text (repeatable; heldout: a build's held-out replies); default hsk, or the recipe's")
    p.add_argument("--tokens", type=int, metavar="N", help="tokens scored per text (default 20000, or the recipe's)")
    p.add_argument("--context", type=int, metavar="N", help="tokens per perplexity window (default 512, or the recipe's)")
    p.add_argument("--stride", type=int, metavar="N", help="step between windows (default 256, or the recipe's)")
    p.add_argument("--prompts", metavar="FILE.jsonl", help="prompts for the Chinese-reply rate: one per line, a string, "
                   "{\"prompt\": ...} or {\"messages\": [...]} (default: HSK sentences, or the build's held-out prompts)")
    p.add_argument("--replies", type=int, metavar="N", help="how many prompts to answer (0: skip the Chinese-reply rate; default 32)")
    p.add_argument("--reply-tokens", type=int, metavar="N", help="longest greedy reply in tokens (default 64)")
    p.add_argument("--template", help="chat format (default: detected from the reference's template, or the build's)")
    p.add_argument("--threads", type=int, metavar="N", help="llama.cpp threads (default: llama.cpp's choice)")
    p.add_argument("-o", "--output-dir", metavar="OUT_DIR",
                   help="where report.md and results.json go (default: ./eval-report, or builds/<name>/eval-report)")
    return p


def _command(args) -> str:
    parts = ["edgezh", "eval", *args.models]
    for flag, value in (("--reference", args.reference), ("--tokens", args.tokens), ("--context", args.context),
                        ("--stride", args.stride), ("--prompts", args.prompts), ("--replies", args.replies),
                        ("--reply-tokens", args.reply_tokens), ("--template", args.template)):
        if value is not None:
            parts += [flag, str(value)]
    for corpus in args.corpus:
        parts += ["--corpus", corpus]
    for text in args.text:
        parts += ["--text", text]
    return " ".join(shlex.quote(p) for p in parts)


def options(args):
    from edgezh.eval.standalone import Options, corpus_name

    return Options(texts=[corpus_name(c) for c in args.corpus] + list(args.text), max_tokens=args.tokens,
                   context_length=args.context, stride=args.stride, prompts=Path(args.prompts) if args.prompts else None,
                   replies=args.replies, reply_max_tokens=args.reply_tokens, template=args.template, threads=args.threads,
                   command=_command(args))


def summary_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The compact table: one row per model — size, perplexity per text, mean KLD, top-1, Chinese replies."""
    corpora = list(results.get("corpora") or {})
    kld = (results.get("kld") or {}).get("variants") or {}
    replies = (results.get("chinese_reply") or {}).get("by_variant") or {}
    front = {p["variant"] for p in ((results.get("kld") or {}).get("chart") or {}).get("points", []) if p.get("pareto")}
    header = ["model", "size MiB", *[f"PPL {c}" for c in corpora], "mean KLD", "top-1", "Chinese"]
    rows = []
    for name, facts in results["variants"].items():
        a = (kld.get(name) or {}).get("all") or {}
        ppl = results.get("perplexity", {}).get(name, {})
        reference = name == results["kld"].get("reference")
        rows.append([name + (" (ref)" if reference else " *" if name in front else ""),
                     f"{facts['bytes'] / 2**20:,.1f}" if facts.get("bytes") else "—",
                     *[f"{ppl[c]:,.3f}" if ppl.get(c) is not None else "—" for c in corpora],
                     "0" if reference else f"{a['mean']:.5f}" if a.get("mean") is not None else "—",
                     "100%" if reference else f"{a['top1']:.1%}" if a.get("top1") is not None else "—",
                     f"{replies[name]['rate']:.0%}" if replies.get(name, {}).get("rate") is not None else "—"])
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def eval_cmd(args) -> int:
    from edgezh.eval.standalone import run

    results, folder = run([Path(m) for m in args.models], Path(args.reference) if args.reference else None, options(args),
                          Path(args.output_dir) if args.output_dir else None)
    header, rows = summary_rows(results)
    k = results["kld"]
    tokens = ", ".join(f"{c} {f['tokens']}" for c, f in results["corpora"].items())
    out.print(f"{results['name']}: {len(results['variants'])} GGUF(s) against {k['reference']}, tokens scored: {tokens}")
    out.print(format_table(header, rows), markup=False)
    out.print("* on the size-vs-KLD Pareto front")
    out.print(f"report: {folder / 'report.md'}  results: {folder / 'results.json'}", markup=False)
    return 0
