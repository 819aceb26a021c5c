"""Resolving a base model: local folder, hub id (cache first), GGUF import, random init."""
