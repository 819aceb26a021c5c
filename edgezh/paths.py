"""Path conventions: recipe-relative paths, `pkg://` files inside installed packages, cache folder."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


class PathResolutionError(ValueError):
    """A path in a recipe or on the command line that does not lead to a file."""


def resolve_path(value: str, base_dir: Path, *, must_exist: bool = True) -> Path:
    """`pkg://package/inner/file` → the file inside the installed package; relative → under base_dir."""
    if value.startswith("pkg://"):
        package, _, inner = value[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise PathResolutionError(f"{value}: Python package '{package}' is not installed (pip install {package.replace('_', '-')})")
        path = Path(next(iter(spec.submodule_search_locations))) / inner
    else:
        path = Path(os.path.expanduser(value))
        if not path.is_absolute():
            path = base_dir / path
    if must_exist and not path.exists():
        raise PathResolutionError(f"{value}: no such file or folder ({path})")
    return path


def cache_dir() -> Path:
    """edgezh's cache (fixtures, hub and extension caches): $EDGEZH_CACHE, else ./.cache/edgezh."""
    path = Path(os.environ.get("EDGEZH_CACHE") or Path.cwd() / ".cache" / "edgezh")
    path.mkdir(parents=True, exist_ok=True)
    return path
