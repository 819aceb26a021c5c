"""The one tokenizer of an evaluation: the base model's HF tokenizer with the chat format's rules.

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
