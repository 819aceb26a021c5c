"""Published shapes of Meta's Llama 3 family, so that a hub id with no cached config still gets estimates.

The values are the ones in each repository's ``config.json`` on the Hugging Face hub (Meta's published
configs): sizes, layers, heads, vocabulary, RoPE settings, context length, tied embeddings. They are facts
about released checkpoints, used only by ``edgezh build --dry-run`` (``edgezh.estimate``); a model that is
actually loaded is always read from its own files. tests/test_conformance.py checks every entry against
the model args Meta ships in the ``llama-models`` package (``llama_models.sku_list``), with the
intermediate size derived from its ``ffn_dim_multiplier`` / ``multiple_of`` as Meta's model code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LLAMA3_VOCAB = 128256
_LLAMA3_ROPE_THETA = 500000.0


def _rope_scaling(factor: float) -> dict[str, Any]:
    """The ``llama3`` RoPE scaling of Llama 3.1 and later (context stretched from 8192 positions)."""
    return {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}


@dataclass(frozen=True)
class PublishedShape:
    """One released checkpoint size, as its config.json describes it."""

    name: str
    """Human name, e.g. "Llama 3.1 8B"."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    vocab_size: int = LLAMA3_VOCAB
    rope_theta: float = _LLAMA3_ROPE_THETA
    rms_norm_eps: float = 1e-5

    def config(self) -> dict[str, Any]:
        """The shape as config.json keys (what `edgezh.estimate` reads from a real config)."""
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.hidden_size // self.num_attention_heads, "vocab_size": self.vocab_size,
                "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope_theta,
                "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
                "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings}


SHAPES: dict[str, PublishedShape] = {
    "llama3-8b": PublishedShape("Llama 3 8B", 4096, 14336, 32, 32, 8, 8192, None, False),
    "llama3-70b": PublishedShape("Llama 3 70B", 8192, 28672, 80, 64, 8, 8192, None, False),
    "llama3.1-8b": PublishedShape("Llama 3.1 8B", 4096, 14336, 32, 32, 8, 131072, _rope_scaling(8.0), False),
    "llama3.1-70b": PublishedShape("Llama 3.1 70B", 8192, 28672, 80, 64, 8, 131072, _rope_scaling(8.0), False),
    "llama3.2-1b": PublishedShape("Llama 3.2 1B", 2048, 8192, 16, 32, 8, 131072, _rope_scaling(32.0), True),
    "llama3.2-3b": PublishedShape("Llama 3.2 3B", 3072, 8192, 28, 24, 8, 131072, _rope_scaling(32.0), True),
}

# Hub ids (base and Instruct share a shape); the hub matches ids without regard to case. Llama 3.1 repositories
# were first published as Meta-Llama-3.1-*, and the llama-models package names Llama 3 as Llama-3-*.
_REPOSITORIES: dict[str, str] = {}
for _key, _names in {
    "llama3-8b": ("Meta-Llama-3-8B", "Llama-3-8B"),
    "llama3-70b": ("Meta-Llama-3-70B", "Llama-3-70B"),
    "llama3.1-8b": ("Llama-3.1-8B", "Meta-Llama-3.1-8B"),
    "llama3.1-70b": ("Llama-3.1-70B", "Meta-Llama-3.1-70B"),
    "llama3.2-1b": ("Llama-3.2-1B",),
    "llama3.2-3b": ("Llama-3.2-3B",),
}.items():
    for _name in _names:
        for _suffix in ("", "-Instruct"):
            _REPOSITORIES[f"meta-llama/{_name}{_suffix}".lower()] = _key


def repositories() -> dict[str, str]:
    """Every known hub id (lower case) → its key in `SHAPES`."""
    return dict(_REPOSITORIES)


def lookup(hub_id: str) -> PublishedShape | None:
    """The published shape of a Meta Llama 3 family hub id, or None for any other id."""
    key = _REPOSITORIES.get(hub_id.strip().lower())
    return SHAPES[key] if key else None
