"""`edgezh explain SECTION`: the recipe schema, documented."""

from __future__ import annotations

from rich.table import Table

from edgezh.errors import UserError
from edgezh.progress import out
from edgezh.recipe_load import explain as explain_rows


def explain(section: str) -> int:
    try:
        rows = explain_rows(section)
    except KeyError as exc:
        raise UserError(exc.args[0]) from None
    table = Table(title=f"recipe section: {section or '(top level)'}", show_lines=False, expand=False)
    for column in ("field", "type", "default", "meaning"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    out.print(table)
    return 0
