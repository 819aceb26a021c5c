"""The `edgezh` command: parse arguments, dispatch to one module per verb, map errors to exit codes.

Exit codes: 0 success, 1 a bug (traceback in the build log), 2 the user's input was wrong
(recipe, file, flag) — printed as clear lines, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from edgezh import __version__

EXIT_USER = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgezh", description="Take a Llama 3 model to Chinese users on their own machines: "
                                "one recipe from fine-tuning to GGUF, Ollama and a terminal chat.")
    p.add_argument("--version", action="version", version=f"edgezh {__version__}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show the libraries' own output (logs, warnings, progress bars) live; without it, a build "
                   "writes them to builds/<name>/build.log")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    b = sub.add_parser("build", help="run a recipe: base → data → sft → dpo → merge → gguf → … (cached, resumable)")
    b.add_argument("recipe", help="recipe YAML file")
    b.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe fields, e.g. sft.lora.rank=16")
    b.add_argument("--dry-run", action="store_true", help="print the plan (cache hits, memory and disk estimates) and stop")
    b.add_argument("--until", metavar="STAGE", help="stop after this stage")
    b.add_argument("--from", dest="start", metavar="STAGE", help="rerun from this stage on (earlier stages must be built)")
    b.add_argument("--force", metavar="STAGE", action="append", default=[], help="rerun this stage even if cached (repeatable)")
    b.add_argument("--allow-pickle", action="store_true", help="accept pickle weights in the base model (unsafe for untrusted files)")
    b.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show the libraries' output live (it always goes to builds/<name>/build.log)")

    ls = sub.add_parser("ls", help="list shipped recipes, chat templates or stages")
    ls.add_argument("what", choices=["recipes", "templates", "stages"])

    e = sub.add_parser("explain", help="print a recipe section's fields with types, defaults and docs")
    e.add_argument("section", nargs="?", default="", help="dotted section, e.g. sft.lora (empty: top level)")

    m = sub.add_parser("merge", help="fold a LoRA adapter into its 16-bit base, shard by shard")
    m.add_argument("base", help="the original 16-bit base model folder (never a 4-bit one)")
    m.add_argument("adapter", help="peft adapter folder")
    m.add_argument("-o", "--output", required=True, help="output folder")
    m.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])

    c = sub.add_parser("convert", help="write a GGUF from a Hugging Face Llama-family folder (or, with --lora, its LoRA adapter)")
    c.add_argument("model", help="model folder (safetensors); with --lora, the base the adapter was trained on")
    c.add_argument("-o", "--output", help="output .gguf (default: <folder>-<outtype>.gguf; with --lora <adapter>-lora-<outtype>.gguf)")
    c.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    c.add_argument("--template", help="chat format (default: detected from the folder)")
    c.add_argument("--adapter", help="LoRA adapter folder to merge on the fly")
    c.add_argument("--lora", metavar="ADAPTER_DIR", help="write this peft LoRA adapter as a GGUF LoRA adapter "
                   "(llama.cpp --lora, Ollama ADAPTER) instead of converting the model")

    q = sub.add_parser("quantize", help="quantize a GGUF with llama.cpp's own quantizer")
    q.add_argument("gguf", help="f32/f16/bf16 GGUF file")
    q.add_argument("types", nargs="+", metavar="TYPE", help="q4_k_m, q4_k_s, q5_k_m, q5_k_s, q6_k, q8_0, …")
    q.add_argument("-o", "--output-dir", help="folder for the results (default: beside the input)")
    q.add_argument("--imatrix", metavar="FILE", help="importance matrix (edgezh's or llama-imatrix's .gguf / .dat); "
                   "needed by the IQ types and q2_k_s")
    q.add_argument("--tensor-type", metavar="REGEX=TYPE", action="append", default=[],
                   help="give the tensors whose GGUF name matches REGEX the ggml TYPE (repeatable; first match wins)")
    q.add_argument("--output-type", metavar="TYPE", help="type of output.weight (e.g. q8_0)")
    q.add_argument("--token-embedding-type", metavar="TYPE", help="type of token_embd.weight (e.g. q4_k)")
    q.add_argument("--pure", action="store_true", help="every tensor in the mix's own type (no k-quant mix rules)")
    q.add_argument("--dry-run", action="store_true", help="print the size each type would have; write nothing")

    mf = sub.add_parser("modelfile", help="write an Ollama Modelfile beside a GGUF")
    mf.add_argument("gguf", help="GGUF file")
    mf.add_argument("--template", help="chat format (default: detected from the GGUF's template)")
    mf.add_argument("--system", help="system prompt (default: the format's Chinese default)")
    mf.add_argument("--num-ctx", type=int, default=4096)

    from edgezh.commands.chat import add_chat_parser, add_serve_parser
    from edgezh.commands.eval import add_eval_parser

    add_eval_parser(sub)

    add_chat_parser(sub)
    add_serve_parser(sub)

    d = sub.add_parser("doctor", help="check the installation: versions, llama.cpp, CUDA, bitsandbytes, DeepSpeed, RAM, disk")
    d.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show what the libraries print while they are checked")
    return p


def print_error(exc: Exception, args: argparse.Namespace | None = None) -> None:
    """A UserError as the person sees it: a recipe's problems under one count line, anything else one
    `error:` line per line of its message. Never a traceback."""
    from rich.markup import escape

    from edgezh.progress import console
    from edgezh.recipe_load import RecipeError

    if isinstance(exc, RecipeError):
        recipe = getattr(args, "recipe", None) or "recipe"
        console.print(f"[bold red]error:[/] {escape(str(recipe))}: {len(exc.problems)} problem(s) in the recipe")
        for problem in exc.problems:
            console.print(f"  {problem}", markup=False)
        return
    for line in str(exc).splitlines() or [type(exc).__name__]:
        console.print(f"[bold red]error:[/] {escape(line)}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "build":  # key=value overrides may come after the flags too
        args.overrides += [item for item in extra if "=" in item and not item.startswith("-")]
        extra = [item for item in extra if item not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from edgezh.errors import UserError
    from edgezh.progress import console

    try:
        return _dispatch(args)
    except UserError as exc:  # the one place a user's mistake becomes its message and exit code 2
        print_error(exc, args)
        return EXIT_USER
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "build":
        from edgezh.commands.build import build

        return build(args)
    if args.command == "ls":
        from edgezh.commands.listing import listing

        return listing(args.what)
    if args.command == "explain":
        from edgezh.commands.explain import explain

        return explain(args.section)
    if args.command in ("merge", "convert", "quantize", "modelfile"):
        from edgezh.commands import export

        return getattr(export, f"{args.command}_cmd")(args)
    if args.command in ("chat", "serve"):
        from edgezh.commands import chat

        return chat.run_chat(args) if args.command == "chat" else chat.run_serve(args)
    if args.command == "eval":
        from edgezh.commands.eval import eval_cmd

        return eval_cmd(args)
    if args.command == "doctor":
        from edgezh.commands.doctor import doctor

        return doctor(verbose=args.verbose)
    return 1


if __name__ == "__main__":
    sys.exit(main())
