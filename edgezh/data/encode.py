"""Encoding through the chat-template registry: token ids, labels and per-token loss weights.

A conversation is rendered with its format's *training* template (transformers' jinja renderer, as
``apply_chat_template(..., return_assistant_tokens_mask=True)`` does; `Encoder.encode_many` says how the
batch path keeps that mask): the template wraps each assistant message's content and its end-of-turn
token in ``{% generation %}``, so the mask marks exactly what the model is trained to say — the stop token included (a model that never learns to stop is the classic
Llama 3 fine-tuning failure). Rendered text is tokenized without adding special tokens (the registry's
BOS rule): exactly one BOS for the llama3 formats, none for ChatML.

``labels`` = the token id where the mask is 1, else -100. ``loss_scale`` = 0 where labels are -100, else
1.0, or the `loss_scale` weight of the agent field the token lies in: ReAct spans recorded by the reader
(mapped to tokens through the tokenizer's offset mapping) and, for ``tool_call``, the tool-call JSON of
an assistant tool-call turn (its end token keeps 1.0).

Padding: the pad token must differ from every stop token of the format, or padded positions would teach
(or hide) the stop. `choose_pad` picks, in order: the tokenizer's own pad if it is not a stop token; a
dedicated pad token (``<|finetune_right_pad_id|>``, ``<pad>``, ``<|pad|>``, ``[PAD]``); the
lowest-numbered ``reserved`` / ``unused`` special token; the lowest-numbered special token the chat
template never prints (e.g. SmolLM2's ``<repo_name>``); otherwise it fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from edgezh import templates
from edgezh.data.conversation import ControlTokens, Conversation, RecordError
from edgezh.errors import UserError

IGNORE = -100
END_OF_TEXT = ("<|end_of_text|>", "<|endoftext|>", "</s>")
PAD_NAMES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]", "<|padding|>")
_RESERVED = re.compile(r"reserved|unused", re.I)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    loss_scale: list[float]

    def __len__(self) -> int:
        return len(self.input_ids)

    def truncated(self, length: int) -> "Encoded":
        return Encoded(self.input_ids[:length], self.labels[:length], self.loss_scale[:length])

    @property
    def trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE)


@dataclass(frozen=True)
class PadChoice:
    token_id: int
    token: str
    reason: str


def _special_tokens(tokenizer) -> dict[int, str]:
    """Added special tokens by id."""
    return {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def choose_pad(tokenizer, chat_format: templates.ChatFormat) -> PadChoice:
    """A pad token distinct from every stop token of ``chat_format`` (rules in the module docstring)."""
    stops = set(chat_format.stop_tokens)
    specials = _special_tokens(tokenizer)
    vocab = tokenizer.get_vocab()
    avoid = stops | {chat_format.bos_token, tokenizer.bos_token, tokenizer.unk_token} - {None}
    own = tokenizer.pad_token
    if own is not None and own not in stops:
        return PadChoice(tokenizer.convert_tokens_to_ids(own), own, "the tokenizer's pad token")
    for name in PAD_NAMES:
        if name in vocab and name not in avoid:
            return PadChoice(vocab[name], name, "a dedicated pad token")
    reserved = sorted(i for i, t in specials.items() if _RESERVED.search(t) and t not in avoid)
    if reserved:
        return PadChoice(reserved[0], specials[reserved[0]], "a reserved special token")
    unused = sorted(i for i, t in specials.items() if t not in avoid and t not in chat_format.training)
    if unused:
        return PadChoice(unused[0], specials[unused[0]], "a special token the chat template never prints")
    raise UserError(f"the tokenizer has no pad token distinct from the stop tokens of the {chat_format.name} format "
                    f"({', '.join(chat_format.stop_tokens)}) and no reserved or unused special token to pad with; "
                    "add a pad token to the tokenizer (tokenizer.add_special_tokens({'pad_token': '<pad>'}))")


def load_tokenizer(folder: Path):
    """The folder's tokenizer; loaded once per process while its files are unchanged (it is only read)."""
    stamp = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
                         if p.is_file() and (p.suffix in (".json", ".model", ".jinja", ".txt") or p.name.startswith("tokenizer"))))
    return _load_tokenizer(str(folder.resolve()), stamp)


@lru_cache(maxsize=4)
def _load_tokenizer(folder: str, stamp: tuple):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


class Encoder:
    """Encodes conversations with one tokenizer and one chat format."""

    def __init__(self, model_dir: Path, template: str, loss_scale: dict[str, float] | None = None):
        self.tokenizer = load_tokenizer(Path(model_dir))
        self.format = templates.get(template)
        self.loss_scale = dict(loss_scale or {})
        self.pad = choose_pad(self.tokenizer, self.format)
        self.bos_id = self.tokenizer.convert_tokens_to_ids(self.format.bos_token) if self.format.bos_token else None
        self.stop_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in self.format.end_tokens}  # a turn ends on one of these

    def control_tokens(self) -> ControlTokens:
        return ControlTokens(list(_special_tokens(self.tokenizer).values()))

    def _apply(self, messages: list[dict[str, Any]], tools: list | None, **kwargs):
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, chat_template=self.format.training, **kwargs)
        except jinja2.TemplateError as exc:
            raise RecordError("template_error", f"the {self.format.name} template refuses this conversation: {exc}") from None

    def length(self, messages: list[dict[str, Any]], tools: list | None = None) -> int:
        """Tokens of the rendered conversation."""
        return len(self._apply(messages, tools, tokenize=True, return_dict=True)["input_ids"])

    def encode(self, conversation: Conversation) -> Encoded:
        """Token ids, labels and loss weights of one conversation (never truncated here)."""
        result = self.encode_many([conversation])[0]
        if isinstance(result, RecordError):
            raise result
        return result

    def encode_many(self, conversations: list[Conversation]) -> list[Encoded | RecordError]:
        """`encode` for a batch: each conversation rendered with the training template (transformers'
        ``render_jinja_template``, which also gives the ``{% generation %}`` character spans), then all
        tokenized together by the fast tokenizer's batch path; the mask is every token overlapping a
        generation span — what ``apply_chat_template(return_assistant_tokens_mask=True)`` computes
        (a test holds the two equal), without its per-token Python loop. A conversation the template
        refuses is a `RecordError` in its place."""
        from transformers.utils.chat_template_utils import render_jinja_template

        results: list[Encoded | RecordError | None] = [None] * len(conversations)
        texts, spans, at = [], [], []
        for i, conversation in enumerate(conversations):
            messages = [{k: v for k, v in m.items() if v is not None} for m in conversation.messages]
            try:
                rendered, generation = render_jinja_template(
                    conversations=[messages], tools=conversation.tools, chat_template=self.format.training,
                    return_assistant_tokens_mask=True, **self.tokenizer.special_tokens_map)
            except jinja2.TemplateError as exc:
                results[i] = RecordError("template_error", f"the {self.format.name} template refuses this conversation: {exc}")
                continue
            texts.append(rendered[0])
            spans.append(generation[0])
            at.append(i)
        encodings = self.tokenizer._tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
        for i, text, generation, encoding in zip(at, texts, spans, encodings):
            results[i] = self._finish(conversations[i], text, generation, encoding.ids, encoding.offsets)
        return results

    def _finish(self, conversation: Conversation, text: str, generation: list, ids: list[int], offsets: list) -> Encoded:
        token_ids = np.asarray(ids, dtype=np.int64)
        bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(ids), dtype=bool)
        for start, end in generation:
            mask |= (bounds[:, 1] > start) & (bounds[:, 0] < end)
        self._check_bos(token_ids)
        runs = _runs(mask)
        turns = [i for i, m in enumerate(conversation.messages) if m["role"] == "assistant"]
        if len(runs) != len(turns):
            raise RuntimeError(f"{len(turns)} assistant turns but {len(runs)} trained spans in the {self.format.name} encoding")
        if runs and not np.isin(token_ids[[end - 1 for _, end in runs]], list(self.stop_ids)).all():
            raise RuntimeError(f"a trained span of the {self.format.name} encoding does not end with a stop token")
        labels = np.where(mask, token_ids, IGNORE).tolist()
        scale = mask.astype(np.float64).tolist()
        if self.loss_scale:
            self._weigh(conversation, text, offsets, runs, turns, scale)
        return Encoded(list(ids), labels, scale)

    @cached_property
    def end_of_text(self) -> tuple[str, int]:
        """The token that ends a document in pre-training text (``<|end_of_text|>`` for Llama 3,
        ``<|endoftext|>`` for SmolLM2 / GPT-style vocabularies, else the tokenizer's EOS)."""
        vocab = self.tokenizer.get_vocab()
        for name in END_OF_TEXT:
            if name in vocab:
                return name, vocab[name]
        if self.tokenizer.eos_token is None:
            raise UserError("the tokenizer has no end-of-text token to join pre-training documents with")
        return self.tokenizer.eos_token, self.tokenizer.eos_token_id

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Pre-training documents: BOS (when the chat format has one) + the text's tokens + end-of-text."""
        if not texts:
            return []
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        head = [self.bos_id] if self.bos_id is not None else []
        tail = [self.end_of_text[1]]
        return [head + list(tokens) + tail for tokens in ids]

    def _check_bos(self, ids: np.ndarray) -> None:
        if self.bos_id is None:
            return
        if int((ids == self.bos_id).sum()) != 1 or ids[0] != self.bos_id:
            raise RuntimeError(f"{self.format.name} encoding must start with exactly one {self.format.bos_token}")

    def _weigh(self, conversation: Conversation, text: str, offsets, runs, turns, scale: list[float]) -> None:
        """Field weights on the tokens of agent spans (the max where fields overlap)."""
        weights: dict[int, float] = {}
        for (start, end), index in zip(runs, turns):
            message = conversation.messages[index]
            if message.get("tool_calls"):
                if "tool_call" in self.loss_scale:
                    for t in range(start, end - 1):  # the JSON; the end token keeps 1.0
                        weights[t] = max(weights.get(t, 0.0), self.loss_scale["tool_call"])
                continue
            spans = [s for s in conversation.spans if s.message == index and s.field in self.loss_scale]
            if not spans:
                continue
            run_start = offsets[start][0]
            run_text = text[run_start:offsets[end - 1][1]]
            content = message["content"].strip()
            base = run_text.find(content)
            if base < 0:
                raise RuntimeError(f"assistant turn {index + 1} is not found verbatim in its {self.format.name} rendering")
            base += run_start
            for span in spans:
                lo, hi = base + span.start, base + span.end
                for t in range(start, end):
                    token_start, token_end = offsets[t]
                    if token_start < hi and token_end > lo:
                        weights[t] = max(weights.get(t, 0.0), self.loss_scale[span.field])
        for t, weight in weights.items():
            scale[t] = weight


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` token ranges where the mask is set."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))
