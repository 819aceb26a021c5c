"""`edgezh ls recipes|templates|stages`."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from edgezh import templates
from edgezh.progress import out
from edgezh.stages import STAGES


def shipped_recipes() -> list[Path]:
    """Recipes shipped with edgezh (the checkout's recipes/ folder)."""
    folder = Path(__file__).resolve().parents[2] / "recipes"
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


def listing(what: str) -> int:
    if what == "recipes":
        from edgezh.recipe_load import RecipeError, load_recipe

        table = Table(title="shipped recipes")
        for column in ("file", "name", "stages", "description"):
            table.add_column(column, overflow="fold")
        for path in shipped_recipes():
            try:
                recipe = load_recipe(path)
            except RecipeError as exc:
                table.add_row(str(path), "", "[red]invalid[/]", str(exc.problems[0]))
                continue
            stages = " → ".join(s.name for s in STAGES if s.enabled(recipe))
            table.add_row(str(path), recipe.name, stages, recipe.description)
    elif what == "templates":
        table = Table(title="chat formats (the template registry)")
        for column in ("name", "stop tokens", "BOS", "tools", "description"):
            table.add_column(column, overflow="fold")
        for name in templates.names():
            fmt = templates.get(name)
            table.add_row(name, " ".join(fmt.stop_tokens), fmt.bos_token or "—", "yes" if fmt.supports_tools else "no", fmt.description)
    else:
        table = Table(title="pipeline stages, in order")
        for column in ("#", "stage", "recipe section", "available", "does"):
            table.add_column(column)
        for i, spec in enumerate(STAGES, 1):
            table.add_row(f"{i:02d}", spec.name, spec.section, "yes" if spec.available else "[dim]not yet[/]", spec.summary)
    out.print(table)
    return 0
