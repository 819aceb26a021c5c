"""The edge runtime: one llama.cpp chat engine shared by the terminal chat and the HTTP server.

- `loader`: the one function that loads a GGUF into llama.cpp and makes its context (`parallel`
  sequences, batch-invariant weight layouts unless `repack`).
- `batch`: the decode thread: continuous batching of every running generation in that context.
- `adapters`: `--lora` adapter sets (parsing, header checks, llama.cpp's adapter calls); a
  generation names the set it decodes with.
- `engine`: renders prompts with the template registry (exactly one BOS), streams UTF-8-safe text
  built from token pieces, stops on every stop token of the format, handles context overflow,
  reports tokens/s, time to first token and context use.
- `structured`: OpenAI `response_format` → a llama.cpp grammar (unsupported schema keywords named).
- `decoding`: token pieces, incremental UTF-8 decoding, stop strings.
- `model_source`: `MODEL.gguf | BUILD_DIR` → the GGUF, its chat format and recorded system prompt.
- `tools`, `toolcalls`, `calculator`: tool definitions (built-in safe tools, YAML and Python tools),
  parsing of Llama 3.1 JSON calls and ReAct steps.
- `chat`: a conversation (history JSONL, resume) and the tool loop with confirmation.
- `server`: the OpenAI-compatible API (FastAPI) over the same engine.
- `plain`: the line-by-line chat used without a terminal.

The `chat` and `serve` sub-commands (their arguments) are `edgezh.commands.chat`.
"""
