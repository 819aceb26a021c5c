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
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    b = sub.add_parser("build", help="run a recipe: base → data → sft → dpo → merge → gguf → … (cached, resumable)")
    b.add_argument("recipe", help="recipe YAML file")
    b.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe fields, e.g. sft.lora.rank=16")
    b.add_argument("--dry-run", action="store_true", help="print the plan (cache hits, memory and disk estimates) and stop")
    b.add_argument("--until", metavar="STAGE", help="stop after this stage")
    b.add_argument("--from", dest="start", metavar="STAGE", help="rerun from this stage on (earlier stages must be built)")
    b.add_argument("--force", metavar="STAGE", action="append", default=[], help="rerun this stage even if cached (repeatable)")
    b.add_argument("--allow-pickle", action="store_true", help="accept pickle weights in the base model (unsafe for untrusted files)")

    ls = sub.add_parser("ls", help="list shipped recipes, chat templates or stages")
    ls.add_argument("what", choices=["recipes", "templates", "stages"])

    e = sub.add_parser("explain", help="print a recipe section's fields with types, defaults and docs")
    e.add_argument("section", nargs="?", default="", help="dotted section, e.g. sft.lora (empty: top level)")

    sub.add_parser("doctor", help="check the installation: versions, llama.cpp, CUDA, bitsandbytes, DeepSpeed, RAM, disk")
    return p


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
        if args.command == "build":
            from edgezh.commands.build import build

            return build(args)
        if args.command == "ls":
            from edgezh.commands.listing import listing

            return listing(args.what)
        if args.command == "explain":
            from edgezh.commands.explain import explain

            return explain(args.section)
        if args.command == "doctor":
            from edgezh.commands.doctor import doctor

            return doctor()
    except UserError as exc:
        console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        return EXIT_USER
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
