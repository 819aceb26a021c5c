"""Tokenizers edgezh can build without a hub: Meta's Llama 3 tokenizer from the llama-models package."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from edgezh.errors import UserError

BOS, EOT, END, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"


def _meta_tokenizer():
    try:
        from llama_models.llama3.tokenizer import Tokenizer
    except ImportError:
        raise UserError("tokenizer: llama3 needs the llama-models package (pip install llama-models)") from None
    return Tokenizer


@lru_cache(maxsize=1)
def _converted():
    """Meta's tiktoken BPE file converted to a `tokenizers` object with its special tokens."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta_cls = _meta_tokenizer()
    meta = meta_cls.get_instance()
    model_file = Path(__import__("llama_models.llama3", fromlist=["x"]).__file__).parent / "tokenizer.model"
    specials = sorted(meta.special_tokens, key=meta.special_tokens.get)
    converter = TikTokenConverter(vocab_file=str(model_file), pattern=meta.pat_str, extra_special_tokens=specials)
    return converter.converted(), meta.n_words


def llama3_tokenizer(model_max_length: int = 8192):
    """A fast HF tokenizer equal to Meta's Llama 3 tokenizer (128 256 tokens).

    BOS is not added by the tokenizer: the chat template emits it (the registry's BOS rule), so
    rendering then tokenizing never doubles it.
    """
    from transformers import PreTrainedTokenizerFast

    backend, n_words = _converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend.__class__.from_str(backend.to_str()),
                                  bos_token=BOS, eos_token=EOT, pad_token=PAD,
                                  model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    if len(tok) != n_words:
        raise RuntimeError(f"converted Llama 3 tokenizer has {len(tok)} tokens, Meta's has {n_words}")
    return tok
