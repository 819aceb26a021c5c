"""Load a recipe: YAML with line numbers → overrides → validation that reports every problem.

Each problem names the file and line, the dotted path, what was wrong, what is allowed, and
"did you mean" for unknown keys. Nothing is written while loading.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from edgezh.errors import UserError
from edgezh.paths import PathResolutionError, resolve_path
from edgezh.recipe import Recipe, RecipeConsistencyError

CLI = "<command line>"


@dataclass(frozen=True)
class Problem:
    source: str  # file name or <command line>
    line: int | None
    path: str  # dotted path ("" for the whole file)
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class RecipeError(UserError):
    """A recipe that cannot be used; `problems` lists every reason (exit 2, nothing written)."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# Fields that hold paths, relative to the recipe's folder, which must exist when given.
# Each entry is a dotted pattern; `*` matches a list index.
PATH_FIELDS = (
    "base.path", "data.sources.*.path", "sft.hostfile", "dpo.hostfile", "sft.deepspeed", "dpo.deepspeed",
    "eval.multiple_choice.*.path", "export.gguf.imatrix.file", "export.gguf.imatrix.text.*",
)
# values of path fields that name a built-in, not a file (DeepSpeed presets; calibration texts)
BUILTIN_NAMES = {"zero2", "zero3", "zero2_offload", "train", "peoples-daily", "hsk"}


def _plain(node: Any, prefix: tuple, lines: dict[tuple, int]) -> Any:
    """Turn ruamel's round-trip nodes into plain data, recording the line of every key/item."""
    if isinstance(node, CommentedMap):
        out = {}
        for key, value in node.items():
            lines[prefix + (str(key),)] = node.lc.key(key)[0] + 1
            out[str(key)] = _plain(value, prefix + (str(key),), lines)
        return out
    if isinstance(node, CommentedSeq):
        out_list = []
        for i, value in enumerate(node):
            lines[prefix + (i,)] = node.lc.item(i)[0] + 1
            out_list.append(_plain(value, prefix + (i,), lines))
        return out_list
    if isinstance(node, str):
        return str(node)
    return node


def _parse_scalar(text: str) -> Any:
    value = YAML(typ="safe").load(text)
    return text if value is None and text.strip() not in ("null", "~", "") else value


def apply_override(data: dict, dotted: str, raw_value: str) -> None:
    """Set `a.b.c` in nested dicts, creating sections on the way; the value is read as YAML."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[int(key)]
            continue
        if not isinstance(node.get(key), (dict, list)):
            node[key] = {}
        node = node[key]
    if isinstance(node, list):
        node[int(keys[-1])] = _parse_scalar(raw_value)
    else:
        node[keys[-1]] = _parse_scalar(raw_value)


def _line_of(lines: dict[tuple, int], loc: tuple) -> int | None:
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that the dotted location `loc` points into (for allowed keys)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = _unwrap(model.model_fields[part].annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """The model type inside Optional[...] / list[...] annotations, else the annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            inner = _unwrap(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return annotation


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _problems_from_validation(exc: ValidationError, source: str, lines: dict, cli: set) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        origin = CLI if any(loc[:i] in cli for i in range(1, len(loc) + 1)) else source
        line = None if origin == CLI else _line_of(lines, loc)
        kind = err["type"]
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, RecipeConsistencyError):
            for path, message in ctx_error.problems:
                ploc = tuple(path.split("."))
                problems.append(Problem(source, _line_of(lines, ploc), path, message))
            continue
        if kind == "extra_forbidden":
            parent = _model_at(loc[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            key = str(loc[-1])
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            message = f"unknown key '{key}'{hint} (allowed: {', '.join(allowed)})"
        elif kind == "missing":
            message = "required but missing"
        elif kind.endswith("_type") and err.get("input") is None:
            message = f"{err['msg']} (got null)"
        elif kind == "value_error":
            message = str(ctx_error) if ctx_error else err["msg"]
        else:
            shown = err.get("input")
            got = "" if isinstance(shown, (dict, list)) else f" (got {shown!r})"
            message = f"{err['msg']}{got}"
        problems.append(Problem(origin, line, _dotted(loc), message))
    return problems


def _walk_paths(data: Any, pattern: list[str], loc: tuple = ()):
    if not pattern:
        yield loc, data
        return
    head, rest = pattern[0], pattern[1:]
    if head == "*":
        if isinstance(data, list):
            for i, item in enumerate(data):
                yield from _walk_paths(item, rest, loc + (i,))
    elif isinstance(data, dict) and head in data:
        yield from _walk_paths(data[head], rest, loc + (head,))


def _check_and_resolve_paths(data: dict, base_dir: Path, source: str, lines: dict, cli: set) -> list[Problem]:
    """Make relative paths absolute (relative to the recipe) and report the ones that do not exist."""
    problems = []
    for pattern in PATH_FIELDS:
        for loc, value in list(_walk_paths(data, pattern.split("."))):
            if not isinstance(value, str) or value in BUILTIN_NAMES:
                continue  # the schema reports the type; built-in names are not files
            try:
                resolved = resolve_path(value, base_dir)
            except PathResolutionError as exc:
                problems.append(Problem(CLI if loc in cli else source, None if loc in cli else _line_of(lines, loc), _dotted(loc), str(exc)))
                continue
            if value.startswith("pkg://"):
                continue  # keep the portable spelling in the config
            node = data
            for part in loc[:-1]:
                node = node[part]
            node[loc[-1]] = str(resolved)
    return problems


def load_recipe(path: str | Path, overrides: list[str] = (), *, allow_pickle: bool = False) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError listing every problem."""
    path = Path(path)
    source = path.name
    if not path.is_file():
        raise RecipeError([Problem(str(path), None, "", "no such recipe file" if not path.exists() else "not a file")])
    lines: dict[tuple, int] = {}
    try:
        tree = YAML(typ="rt").load(path.read_text(encoding="utf-8"))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise RecipeError([Problem(source, mark.line + 1 if mark else None, "", f"not valid YAML: {exc.problem}")]) from None
    except UnicodeDecodeError:
        raise RecipeError([Problem(source, None, "", "not UTF-8 text")]) from None
    if not isinstance(tree, CommentedMap):
        raise RecipeError([Problem(source, 1, "", "a recipe is a YAML mapping (key: value lines) at the top level")])
    data = _plain(tree, (), lines)
    data.setdefault("name", path.stem)

    problems: list[Problem] = []
    cli: set[tuple] = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(Problem(CLI, None, "", f"override {item!r} is not key.path=value"))
            continue
        try:
            apply_override(data, key, value)
            cli.add(tuple(int(p) if p.isdigit() else p for p in key.split(".")))
        except (ValueError, IndexError, TypeError, AttributeError):
            problems.append(Problem(CLI, None, key, f"cannot set {key!r}: no such list item or section"))
    if allow_pickle:
        data.setdefault("base", {})
        if isinstance(data["base"], dict):
            data["base"]["allow_pickle"] = True

    problems += _check_and_resolve_paths(data, path.resolve().parent, source, lines, cli)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems += _problems_from_validation(exc, source, lines, cli)
        recipe = None
    if problems:
        problems.sort(key=lambda p: (p.source == CLI, p.line or 0))
        raise RecipeError(problems)
    return recipe


def explain(dotted: str = "") -> list[tuple[str, str, str, str]]:
    """Rows (field, type, default, doc) for a recipe section, e.g. `sft.lora`."""
    model: Any = Recipe
    for part in [p for p in dotted.split(".") if p]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            known = sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
            close = difflib.get_close_matches(part, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise KeyError(f"no recipe section '{dotted}'{hint} (sections here: {', '.join(known)})")
        model = _unwrap(model.model_fields[part].annotation)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise KeyError(f"'{dotted}' is a field, not a section; explain its parent")
    rows = []
    for name, field in model.model_fields.items():
        if field.is_required():
            default = "(required)"
        elif field.default_factory is not None:
            default = repr(field.default_factory())
        else:
            default = repr(field.default)
        if isinstance(default, str) and len(default) > 60:
            default = "(section defaults)"
        rows.append((name, _type_name(field.annotation), default, field.description or ""))
    return rows


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "").replace("edgezh.recipe.", "")
    return text.replace("Annotated[", "").replace(", FieldInfo(annotation=NoneType, required=True, metadata=[Gt(gt=0)])]", "")
