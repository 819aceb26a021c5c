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
    _add_tool_arguments(p)
    return p


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP API over a GGUF (chat, completions, tools)")
    _add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $EDGEZH_API_KEY if set)")
    p.add_argument("--model-name", help="the model id clients send (default: the GGUF's file name without .gguf)")
    p.add_argument("--queue", type=int, default=8, metavar="N",
                   help="requests that may wait for the model; more get HTTP 429 (default 8)")
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
    from edgezh.runtime.engine import check_gguf

    source, params = _source_and_params(args)
    check_gguf(source.path)  # a missing or non-GGUF file is a one-line error before the UI starts
    toolbox = _toolbox(args)
    resume = Path(args.resume).expanduser() if args.resume else None
    if resume is not None:
        from edgezh.runtime.chat import ChatSession

        ChatSession.load_history(resume)  # a bad history file is a one-line error too
    try:
        from edgezh.tui import ChatApp, ChatConfig
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("textual", "edgezh"):
            raise UserError("the terminal chat needs Textual: pip install 'edgezh[tui]'") from None
        raise
    config = ChatConfig(model=source.path, template=args.template or source.template,
                        system=args.system or source.system, n_ctx=args.ctx or source.defaults.get("n_ctx"),
                        threads=args.threads, gpu_layers=args.gpu_layers, params=params, resume=resume,
                        history=Path(args.history).expanduser() if args.history else None,
                        toolbox=toolbox, auto_confirm=args.yes)
    app = ChatApp(config)
    app.run()
    return app.return_code or 0


def run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("edgezh serve needs FastAPI and uvicorn: pip install 'edgezh[serve]'") from None
    from edgezh.runtime.engine import Engine
    from edgezh.runtime.server import ServerConfig, serve

    source, params = _source_and_params(args)
    if args.queue < 0:
        raise UserError(f"--queue must be ≥ 0, got {args.queue}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a TCP port")
    engine = Engine.load(source.path, template=args.template or source.template,
                         n_ctx=args.ctx or source.defaults.get("n_ctx"), n_threads=args.threads,
                         n_gpu_layers=args.gpu_layers)
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
