"""Context-extension overrides (`rope_theta`, `max_position_embeddings`) as changes to a model config.

Training applies them to the config it loads; the merge writes them into the merged model's
config.json, so a LoRA trained with a longer context is exported with the same RoPE it learned.
"""

from __future__ import annotations

from typing import Any


def context_changes(config: dict, overrides: dict) -> dict[str, Any]:
    """Top-level config keys to set for `overrides`. transformers 5 keeps rope_theta inside
    `rope_parameters`; configs that still have a top-level `rope_theta` (and no rope_parameters) keep it there."""
    changes: dict[str, Any] = {}
    if overrides.get("rope_theta") is not None:
        rope = dict(config.get("rope_parameters") or {})
        if rope or "rope_theta" not in config:
            rope["rope_theta"] = float(overrides["rope_theta"])
            rope.setdefault("rope_type", "default")
            changes["rope_parameters"] = rope
        else:
            changes["rope_theta"] = float(overrides["rope_theta"])
    if overrides.get("max_position_embeddings") is not None:
        changes["max_position_embeddings"] = int(overrides["max_position_embeddings"])
    return changes
