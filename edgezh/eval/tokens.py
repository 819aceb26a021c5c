"""The one tokenizer of an evaluation: the base model's HF tokenizer with the chat format's rules
(`GGUFTokenizer`: a GGUF's own vocabulary through llama.cpp, for `edgezh eval` on files without one).

Every text is tokenized here once; transformers and llama.cpp then receive the same token ids, so
the backends cannot disagree about tokenization. The BOS rule comes from the template registry:
llama3/llama3.1 start every sequence with `<|begin_of_text|>`, ChatML has no BOS.
"""

from __future__ import annotations

from pathlib import Path

from edgezh import templates
from edgezh.errors import UserError


class EvalTokenizer:
    """The base model's tokenizer plus the BOS id, stop ids and answer-letter ids of its chat format."""

    def __init__(self, folder: Path, template: str):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(folder)
        self.hf.model_max_length = 1 << 40  # corpora are longer than a context; windows are cut later
        self.template = template
        self.format = templates.get(template)
        self.bos_id = self._token_id(self.format.bos_token) if self.format.bos_token else None
        self.stop_ids = [i for i in (self._token_id(t, required=False) for t in self.format.stop_tokens) if i is not None]
        if not self.stop_ids:
            raise UserError(f"{folder}: the tokenizer knows none of the {template} stop tokens {self.format.stop_tokens}")

    def __len__(self) -> int:
        return len(self.hf)

    def _token_id(self, token: str, required: bool = True) -> int | None:
        found = self.hf.convert_tokens_to_ids(token)
        if found is None or found == self.hf.unk_token_id:
            if required:
                raise UserError(f"the tokenizer has no {token!r} token, which the {self.template} chat format needs")
            return None
        return int(found)

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text, no special tokens added."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def with_bos(self, ids: list[int]) -> list[int]:
        """`ids` behind the BOS when the chat format has one."""
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """A conversation rendered through the registry with the generation prompt (the template prints
        its own BOS, so nothing is added)."""
        text = templates.render(self.template, messages, add_generation_prompt=True)
        return self.encode(text)

    def letter_id(self, letter: str) -> int:
        """The id of an answer letter ("A"…"D"), which must be one token (as the official C-Eval/CMMLU
        scripts assume when they read the letter's logit)."""
        ids = self.encode(letter)
        if len(ids) != 1:
            raise UserError(f"the tokenizer splits the answer letter {letter!r} into {len(ids)} tokens; "
                            "letter scoring needs one token per letter")
        return ids[0]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


_SILENT = None  # the log callback that drops llama.cpp's loader lines (kept alive while installed)


def _quietly(load):
    """`load()` with llama.cpp's native log dropped (a vocabulary load prints hundreds of lines), then
    llama-cpp-python's own log callback back in place."""
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    global _SILENT
    if _SILENT is None:
        _SILENT = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_SILENT, ctypes.c_void_p(0))
    try:
        return load()
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


class GGUFTokenizer:
    """The same interface over a GGUF's own vocabulary (llama.cpp, vocabulary only): for `edgezh eval` on
    GGUF files that come without an HF folder. The chat format is the one given, else the one detected from
    the GGUF's embedded template; plain text is tokenized without BOS, special-token text parsed as such
    (as the HF tokenizer does)."""

    def __init__(self, path: Path, template: str | None = None):
        import llama_cpp

        from edgezh.gguf_meta import read_metadata

        self.path = Path(path)
        if template is None:
            own = read_metadata(self.path, ["tokenizer.chat_template"]).get("tokenizer.chat_template")
            template = templates.detect(own if isinstance(own, str) else None)
            if template is None:
                raise UserError(f"{self.path}: its chat template is none of edgezh's formats "
                                f"({', '.join(templates.names())}); pass --template")
        try:
            self.format = templates.get(template)
        except KeyError as exc:
            raise UserError(str(exc.args[0])) from None
        self.template = template
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = _quietly(lambda: llama_cpp.llama_model_load_from_file(str(self.path).encode(), params))
        if not self._model:
            raise UserError(f"{self.path}: llama.cpp {llama_cpp.__version__} cannot read this GGUF's vocabulary")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.bos_id = self._token_id(self.format.bos_token) if self.format.bos_token else None
        self.stop_ids = [i for i in (self._token_id(t, required=False) for t in self.format.stop_tokens) if i is not None]
        if not self.stop_ids:
            raise UserError(f"{self.path}: the vocabulary knows none of the {template} stop tokens {self.format.stop_tokens}")

    def __len__(self) -> int:
        return self.n_vocab

    def _token_id(self, token: str, required: bool = True) -> int | None:
        ids = self.encode(token)
        if len(ids) != 1:
            if required:
                raise UserError(f"{self.path}: the vocabulary has no {token!r} token, which the {self.template} chat format needs")
            return None
        return int(ids[0])

    def encode(self, text: str) -> list[int]:
        import llama_cpp

        data = text.encode("utf-8")
        room = len(data) + 8
        ids = (llama_cpp.llama_token * room)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), ids, room, False, True)
        if n < 0:  # more tokens than bytes cannot happen with a BPE vocabulary; retry with the size asked for
            room = -n
            ids = (llama_cpp.llama_token * room)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), ids, room, False, True)
        return list(ids[:n])

    def with_bos(self, ids: list[int]) -> list[int]:
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.encode(templates.render(self.template, messages, add_generation_prompt=True))

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens left out."""
        import ctypes

        import llama_cpp

        out = bytearray()
        buf = ctypes.create_string_buffer(256)
        for token in ids:
            n = llama_cpp.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, False)
            out += buf.raw[:n]
        return out.decode("utf-8", "replace")

    def close(self) -> None:
        import llama_cpp

        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = self._vocab = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
