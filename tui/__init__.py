"""The terminal chat (`edgezh chat`), installed as `edgezh.tui`: a Textual app over
`edgezh.runtime` — the same engine, templates and UTF-8 handling as `edgezh serve`."""

from .app import ChatApp, ChatConfig

__all__ = ["ChatApp", "ChatConfig"]
