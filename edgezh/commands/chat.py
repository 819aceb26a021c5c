"""`edgezh chat` and `edgezh serve`: their argparse declarations and what they run.

`edgezh.cli` declares them with `add_chat_parser(sub)` / `add_serve_parser(sub)` and dispatches to
`run_chat(args)` / `run_serve(args)`. Both raise `UserError` for anything the user can fix (the CLI
prints it as one line, exit 2). `python -m edgezh.runtime chat|serve …` runs them without the rest of
the CLI (`main`). The runtime (engine, server, chat session) and the TUI are imported only when a
command runs, never by the runtime for its arguments.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from edgezh.errors import UserError

DEFAULT_PORT = 8000


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a .gguf file, or an edgezh build folder (builds/<name>) whose GGUF to run")
    p.add_argument("--quant", metavar="TYPE", help="which GGUF of a build folder (default: q4_k_m)")
    p.add_argument("--template", help="chat format (default: detected from the GGUF's template, or the build's)")
    p.add_argument("--system", help="system prompt (default: the build's, else the format's Chinese default)")
    p.add_argument("--ctx", type=int, metavar="N", help="context size in tokens (default: the build's num_ctx, "
                   "else the model's, at most 4096)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: physical cores)")
    p.add_argument("--gpu-layers", type=int, metavar="N", help="layers on the GPU (default: all when llama.cpp "
                   "was built with CUDA/Metal/Vulkan, else 0)")
    p.add_argument("--repack", action="store_true", help="let llama.cpp repack quantized weights for its CPU "
                   "kernels (its default; answers then depend on how many requests decode together)")
    p.add_argument("--lora", action="append", metavar="SPEC", help="a LoRA adapter set, SPEC = [NAME=]FILE[:SCALE][,FILE[:SCALE]…]: "
                   "adapter GGUFs applied together, each with its scale (default 1.0); repeat for several sets. "
                   "NAME defaults to the file stems joined by '+'; serve offers each set as MODEL:NAME, the chat "
                   "switches with Ctrl+L (plain chat: /lora NAME|off)")
    s = p.add_argument_group("sampling (defaults: the build's Modelfile settings)")
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-p", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--repeat-penalty", type=float)
    s.add_argument("--max-tokens", type=int, help="longest answer in tokens (default 512)")
    s.add_argument("--seed", type=int, help="sampling seed (default: random)")


def _add_tool_arguments(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("tools")
    t.add_argument("--tools", action="store_true", help="let the model call the built-in tools (calculator, "
                   "date/time, unit conversion, note search) and installed edgezh.tools entry points")
    t.add_argument("--tools-file", metavar="YAML", help="user tools: name, JSON schema, command argv or python "
                   "module:function (implies --tools)")
    t.add_argument("--notes", metavar="DIR", help="sandbox folder the note-search tool may read (and where "
                   "command tools run)")


def add_chat_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("chat", help="chat with a GGUF in the terminal (Textual; streaming, tools, history)")
    _add_model_arguments(p)
    p.add_argument("--resume", metavar="FILE", help="continue a saved chat (JSONL history file)")
    p.add_argument("--history", metavar="FILE", help="where to save this chat (default: a new file under "
                   "$EDGEZH_CACHE/chats/)")
    p.add_argument("--yes", "-y", action="store_true", help="run tool calls without asking")
    p.add_argument("--plain", action="store_true", help="a line-by-line chat on stdin/stdout instead of the "
                   "terminal app (the default when stdin or stdout is not a terminal)")
    _add_tool_arguments(p)
    return p


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP API over a GGUF (chat, completions, tools)")
    _add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $EDGEZH_API_KEY if set)")
    p.add_argument("--model-name", help="the model id clients send (default: the GGUF's file name without .gguf)")
    p.add_argument("--parallel", type=int, metavar="N", help="sequences decoding together in one llama.cpp "
                   "context (continuous batching; default: 4, fewer when their KV cache would not fit in memory)")
    p.add_argument("--queue", type=int, default=8, metavar="N",
                   help="requests that may wait for a free sequence; more get HTTP 429 (default 8)")
    return p


def _source_and_params(args: argparse.Namespace) -> tuple[Any, Any]:
    from edgezh.runtime.engine import SamplingParams
    from edgezh.runtime.model_source import resolve

    source = resolve(args.model, args.quant)
    defaults = {k: v for k, v in source.defaults.items() if k != "n_ctx"}
    given = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
             "repeat_penalty": args.repeat_penalty, "max_tokens": args.max_tokens, "seed": args.seed}
    params = SamplingParams(**{**defaults, **{k: v for k, v in given.items() if v is not None}})
    problems = params.problems()
    if problems:
        raise UserError("; ".join(problems))
    if args.ctx is not None and args.ctx < 64:
        raise UserError(f"--ctx {args.ctx} is too small (at least 64 tokens)")
    return source, params


def _toolbox(args: argparse.Namespace) -> Any:
    from edgezh.runtime.tools import Toolbox, builtin_tools, entry_point_tools, load_tools_file

    notes = Path(args.notes).expanduser() if args.notes else None
    if notes is not None and not notes.is_dir():
        raise UserError(f"--notes {notes}: no such folder")
    if not (args.tools or args.tools_file):
        return Toolbox()
    tools = builtin_tools(notes) + entry_point_tools()
    if args.tools_file:
        tools += load_tools_file(Path(args.tools_file), cwd=notes)
    return Toolbox(tools)


def run_chat(args: argparse.Namespace) -> int:
    """Load the model first (a model that cannot load is one error line, before any UI), then the
    Textual app on a terminal, or the plain line-by-line chat without one."""
    import sys

    source, params = _source_and_params(args)
    adapters = _adapter_sets(args)
    toolbox = _toolbox(args)
    resume = Path(args.resume).expanduser() if args.resume else None
    if resume is not None:
        from edgezh.runtime.chat import ChatSession

        ChatSession.load_history(resume)  # a bad history file is a one-line error too
    plain = args.plain or not (sys.stdin.isatty() and sys.stdout.isatty())
    if not plain:
        try:
            from edgezh.tui import ChatApp, ChatConfig
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in ("textual", "edgezh"):
                raise UserError("the terminal chat needs Textual: pip install 'edgezh[tui]'") from None
            raise
    engine = _load_engine(args, source, parallel=1, adapters=adapters)
    history = Path(args.history).expanduser() if args.history else None
    system = args.system or source.system
    if plain:
        from edgezh.runtime.plain import plain_chat

        return plain_chat(engine, params, system=system, toolbox=toolbox, resume=resume, history=history,
                          auto_confirm=args.yes)
    config = ChatConfig(model=source.path, template=args.template or source.template, system=system,
                        n_ctx=args.ctx or source.defaults.get("n_ctx"), threads=args.threads,
                        gpu_layers=args.gpu_layers, params=params, resume=resume, history=history,
                        toolbox=toolbox, auto_confirm=args.yes, repack=args.repack, adapters=adapters)
    app = ChatApp(config, engine=engine)
    app.run()
    return app.return_code or 0


def _adapter_sets(args: argparse.Namespace) -> tuple[Any, ...]:
    """The `--lora` sets, parsed (their files are checked when the model loads)."""
    from edgezh.runtime.adapters import parse_specs

    return parse_specs(getattr(args, "lora", None))


def _load_engine(args: argparse.Namespace, source: Any, *, parallel: int, adapters: tuple[Any, ...] = ()) -> Any:
    """The one load for chat and serve (errors are UserErrors)."""
    import sys

    from edgezh.runtime.engine import Engine

    shown = sys.stderr.isatty()
    if shown:  # on a terminal only, and erased after: an error stays the one line printed
        print(f"loading {source.path.name} …", end="", file=sys.stderr, flush=True)
    try:
        return Engine.load(source.path, template=args.template or source.template,
                           n_ctx=args.ctx or source.defaults.get("n_ctx"), n_threads=args.threads,
                           n_gpu_layers=args.gpu_layers, parallel=parallel, repack=args.repack,
                           adapters=adapters)
    finally:
        if shown:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def default_parallel(path: Path, n_ctx: int | None) -> int:
    """4 sequences (llama-server's default slot count), fewer when their KV cache would take more
    than a quarter of the memory that is available now."""
    try:
        import psutil

        from edgezh.gguf_meta import read_metadata
        from edgezh.sizes import kv_cache_bytes

        meta = read_metadata(path, ["{arch}.block_count", "{arch}.attention.head_count",
                                    "{arch}.attention.head_count_kv", "{arch}.embedding_length",
                                    "{arch}.context_length"])
        heads = int(meta["{arch}.attention.head_count"])
        kv_heads = int(meta.get("{arch}.attention.head_count_kv") or heads)
        ctx = n_ctx or min(4096, int(meta.get("{arch}.context_length") or 4096))
        per_sequence = kv_cache_bytes(int(meta["{arch}.block_count"]), kv_heads,
                                      int(meta["{arch}.embedding_length"]) // heads, ctx)
        budget = psutil.virtual_memory().available // 4
    except Exception:
        return 4
    return max(1, min(4, budget // max(1, per_sequence)))


def run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("edgezh serve needs FastAPI and uvicorn: pip install 'edgezh[serve]'") from None
    from edgezh.runtime.server import ServerConfig, serve

    source, params = _source_and_params(args)
    adapters = _adapter_sets(args)
    if args.queue < 0:
        raise UserError(f"--queue must be ≥ 0, got {args.queue}")
    if args.parallel is not None and args.parallel < 1:
        raise UserError(f"--parallel must be ≥ 1, got {args.parallel}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a TCP port")
    from edgezh.runtime.engine import check_gguf

    check_gguf(source.path)
    parallel = args.parallel or default_parallel(source.path, args.ctx or source.defaults.get("n_ctx"))
    engine = _load_engine(args, source, parallel=parallel, adapters=adapters)
    config = ServerConfig(model_id=args.model_name or source.path.name.removesuffix(".gguf"),
                          api_key=args.api_key or os.environ.get("EDGEZH_API_KEY") or None,
                          queue_size=args.queue, defaults=params, system=args.system or source.system)
    return serve(engine, config, host=args.host, port=args.port)


def main(argv: list[str] | None = None) -> int:
    """`python -m edgezh.runtime chat|serve …` (the same as `edgezh chat|serve …`)."""
    import sys

    parser = argparse.ArgumentParser(prog="python -m edgezh.runtime")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_chat_parser(sub)
    add_serve_parser(sub)
    args = parser.parse_args(argv)
    try:
        return run_chat(args) if args.command == "chat" else run_serve(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
