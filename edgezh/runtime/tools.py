"""Tools the chat may call: built-in safe ones and the user's own.

Built in: `calculator` (AST-walking arithmetic, no eval), `datetime` (now, in a time zone),
`convert_units` (length, mass, area, volume, time, speed, data, temperature, Chinese units such
as 斤 and 亩), `search_notes` (text search in a sandbox folder; nothing outside it is read).

User tools come from a YAML file:

```yaml
tools:
  - name: word_count
    description: Count the characters of a file in the notes folder
    parameters:                       # JSON schema of the arguments
      type: object
      properties: {path: {type: string}}
      required: [path]
    command: [wc, -m, "{path}"]       # argv; each {arg} is filled from that argument, no shell
    timeout: 10
  - name: greet
    description: Say hello
    parameters: {type: object, properties: {name: {type: string}}, required: [name]}
    python: mypackage.tools:greet     # called as greet(name=...)
```

or from installed packages that declare an entry point in the `edgezh.tools` group (a `Tool`, a
list of them, or a function returning them). A tool runs only after the user confirms it
(`--yes` confirms all); its arguments are checked against its schema first.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from edgezh.errors import UserError
from edgezh.runtime.calculator import CalculatorError, evaluate

MAX_RESULT_CHARS = 4000


class ToolError(Exception):
    """A tool call that cannot run (unknown tool, bad arguments) or that failed."""


@dataclass(frozen=True)
class ToolCall:
    """A call the model asked for."""

    name: str
    arguments: dict[str, Any]
    id: str = ""

    def describe(self) -> str:
        return f"{self.name}({json.dumps(self.arguments, ensure_ascii=False)})"


@dataclass(frozen=True)
class Tool:
    """A function the model may call: `run(arguments) -> str`."""

    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any]], Any] = field(compare=False)
    origin: str = "built-in"

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style tool declaration, as the chat templates render it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


class Toolbox:
    """Tools by name; checks arguments and turns any failure into a result the model can read."""

    def __init__(self, tools: Iterable[Tool] = ()):
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}", tool.name):
            raise UserError(f"tool name {tool.name!r}: use letters, digits, _ . - (at most 64)")
        if tool.name in self.tools:
            raise UserError(f"tool {tool.name!r} is declared twice ({self.tools[tool.name].origin}, {tool.origin})")
        self.tools[tool.name] = tool

    def __bool__(self) -> bool:
        return bool(self.tools)

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def schemas(self) -> list[dict[str, Any]]:
        return [tool.schema() for tool in self.tools.values()]

    def check(self, call: ToolCall) -> None:
        """ToolError when the tool is unknown or the arguments do not match its schema."""
        tool = self.tools.get(call.name)
        if tool is None:
            raise ToolError(f"unknown tool {call.name!r} (available: {', '.join(self.tools) or 'none'})")
        problems = schema_problems(call.arguments, tool.parameters)
        if problems:
            raise ToolError(f"{call.name}: " + "; ".join(problems))

    def run(self, call: ToolCall) -> str:
        """The tool's result as text; failures come back as 'error: …' for the model to read."""
        try:
            self.check(call)
            result = self.tools[call.name].run(dict(call.arguments))
        except (ToolError, CalculatorError) as exc:
            return f"error: {exc}"
        except Exception as exc:  # a user tool failing must not end the chat
            return f"error: {call.name} failed: {type(exc).__name__}: {exc}"
        text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
        return text if len(text) <= MAX_RESULT_CHARS else text[:MAX_RESULT_CHARS] + " …(truncated)"


_JSON_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                            "boolean": (bool,), "array": (list,), "object": (dict,), "null": (type(None),)}


def schema_problems(arguments: Any, schema: dict[str, Any]) -> list[str]:
    """The subset of JSON schema tool declarations use: object, properties, required, type, enum."""
    if not isinstance(arguments, dict):
        return ["arguments must be a JSON object"]
    problems = []
    properties = schema.get("properties") or {}
    for name in schema.get("required") or []:
        if name not in arguments:
            problems.append(f"missing argument {name!r}")
    for name, value in arguments.items():
        spec = properties.get(name)
        if spec is None:
            if schema.get("additionalProperties") is False or properties:
                problems.append(f"unknown argument {name!r} (expected: {', '.join(properties) or 'none'})")
            continue
        kinds = spec.get("type")
        if kinds:
            kinds = [kinds] if isinstance(kinds, str) else kinds
            ok = any(isinstance(value, _JSON_TYPES.get(kind, object)) and
                     not (kind in ("integer", "number") and isinstance(value, bool)) for kind in kinds)
            if not ok:
                problems.append(f"argument {name!r} must be {' or '.join(kinds)}, got {type(value).__name__}")
                continue
        if "enum" in spec and value not in spec["enum"]:
            problems.append(f"argument {name!r} must be one of {spec['enum']}")
    return problems


# --- built-in tools ----------------------------------------------------------------------------------

def _calculator(arguments: dict[str, Any]) -> str:
    return str(evaluate(str(arguments["expression"])))


_WEEKDAYS = "星期一 星期二 星期三 星期四 星期五 星期六 星期日".split()


def _datetime(arguments: dict[str, Any]) -> str:
    zone_name = arguments.get("timezone")
    if zone_name:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            now = _dt.datetime.now(ZoneInfo(zone_name))
        except (ZoneInfoNotFoundError, ValueError):
            raise ToolError(f"unknown time zone {zone_name!r} (IANA names such as Asia/Shanghai)") from None
    else:
        now = _dt.datetime.now().astimezone()
    return json.dumps({"iso": now.isoformat(timespec="seconds"), "date": now.strftime("%Y-%m-%d"),
                       "time": now.strftime("%H:%M:%S"), "weekday": _WEEKDAYS[now.weekday()],
                       "timezone": zone_name or str(now.tzinfo)}, ensure_ascii=False)


# factor to the category's base unit (metre, kilogram, square metre, litre, second, m/s, byte)
_UNITS: dict[str, dict[str, float]] = {
    "length": {"m": 1, "meter": 1, "metre": 1, "米": 1, "km": 1000, "公里": 1000, "千米": 1000, "cm": 0.01,
               "厘米": 0.01, "mm": 0.001, "毫米": 0.001, "um": 1e-6, "nm": 1e-9, "mi": 1609.344, "mile": 1609.344,
               "英里": 1609.344, "yd": 0.9144, "yard": 0.9144, "ft": 0.3048, "foot": 0.3048, "feet": 0.3048,
               "英尺": 0.3048, "in": 0.0254, "inch": 0.0254, "英寸": 0.0254, "nmi": 1852, "海里": 1852,
               "里": 500, "丈": 10 / 3, "尺": 1 / 3, "寸": 1 / 30},
    "mass": {"kg": 1, "千克": 1, "公斤": 1, "g": 0.001, "克": 0.001, "mg": 1e-6, "毫克": 1e-6, "t": 1000,
             "吨": 1000, "lb": 0.45359237, "pound": 0.45359237, "磅": 0.45359237, "oz": 0.028349523125,
             "盎司": 0.028349523125, "斤": 0.5, "jin": 0.5, "两": 0.05},
    "area": {"m2": 1, "平方米": 1, "km2": 1e6, "平方公里": 1e6, "cm2": 1e-4, "ha": 1e4, "公顷": 1e4,
             "亩": 10000 / 15, "mu": 10000 / 15, "acre": 4046.8564224, "英亩": 4046.8564224, "ft2": 0.09290304},
    "volume": {"l": 1, "升": 1, "ml": 0.001, "毫升": 0.001, "m3": 1000, "立方米": 1000, "gal": 3.785411784,
               "gallon": 3.785411784, "加仑": 3.785411784, "floz": 0.0295735295625},
    "time": {"s": 1, "秒": 1, "ms": 0.001, "min": 60, "分钟": 60, "h": 3600, "小时": 3600, "day": 86400,
             "天": 86400, "week": 604800, "周": 604800},
    "speed": {"m/s": 1, "km/h": 1 / 3.6, "kmh": 1 / 3.6, "mph": 0.44704, "knot": 0.514444, "节": 0.514444},
    "data": {"bit": 0.125, "b": 1, "byte": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 1024,
             "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4},
}
_TEMPERATURE = {"c": "C", "°c": "C", "celsius": "C", "摄氏度": "C", "f": "F", "°f": "F", "fahrenheit": "F",
                "华氏度": "F", "k": "K", "kelvin": "K", "开尔文": "K"}


def _unit(name: str) -> tuple[str, str]:
    key = name.strip()
    for candidate in (key, key.lower()):
        if candidate in _TEMPERATURE:
            return "temperature", _TEMPERATURE[candidate]
        for category, table in _UNITS.items():
            if candidate in table:
                return category, candidate
    raise ToolError(f"unknown unit {name!r}")


def _convert_units(arguments: dict[str, Any]) -> str:
    value = arguments["value"]
    (kind_a, a), (kind_b, b) = _unit(str(arguments["from_unit"])), _unit(str(arguments["to_unit"]))
    if kind_a != kind_b:
        raise ToolError(f"cannot convert {kind_a} ({arguments['from_unit']}) to {kind_b} ({arguments['to_unit']})")
    if kind_a == "temperature":
        kelvin = {"C": value + 273.15, "F": (value - 32) * 5 / 9 + 273.15, "K": value}[a]
        result = {"C": kelvin - 273.15, "F": (kelvin - 273.15) * 9 / 5 + 32, "K": kelvin}[b]
    else:
        result = value * _UNITS[kind_a][a] / _UNITS[kind_a][b]
    return f"{value} {arguments['from_unit']} = {round(result, 10):g} {arguments['to_unit']}"


NOTE_SUFFIXES = {".txt", ".md", ".markdown", ".org", ".rst", ".text", ".csv", ".json", ".yaml", ".yml"}


def search_notes(root: Path, query: str, limit: int = 20) -> list[str]:
    """Lines containing `query` (case-insensitive) in text files under `root`; files whose real
    path leaves `root` (symlinks) are skipped."""
    root = root.resolve()
    needle = query.casefold().strip()
    if not needle:
        raise ToolError("empty query")
    hits: list[str] = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix.lower() not in NOTE_SUFFIXES:
                continue
            real = path.resolve()
            if not real.is_relative_to(root) or not real.is_file() or real.stat().st_size > 2 ** 20:
                continue
            with open(real, encoding="utf-8", errors="replace") as handle:
                for number, line in enumerate(handle, 1):
                    if needle in line.casefold():
                        hits.append(f"{real.relative_to(root)}:{number}: {line.strip()[:200]}")
                        if len(hits) >= limit:
                            return hits
    return hits


def builtin_tools(notes: Path | None = None) -> list[Tool]:
    """The safe tools; `search_notes` only when a notes folder is given."""
    tools = [
        Tool("calculator", "Evaluate an arithmetic expression (+ - * / // % **, parentheses, sqrt, log, sin, pi…)",
             {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. (3+4)*2**3"}},
              "required": ["expression"]}, _calculator),
        Tool("datetime", "Current date, time and weekday, optionally in an IANA time zone",
             {"type": "object", "properties": {"timezone": {"type": "string", "description": "e.g. Asia/Shanghai"}}},
             _datetime),
        Tool("convert_units", "Convert a value between units (length, mass, area, volume, time, speed, data, "
             "temperature; Chinese units such as 斤, 亩, 里)",
             {"type": "object", "properties": {"value": {"type": "number"}, "from_unit": {"type": "string"},
                                               "to_unit": {"type": "string"}},
              "required": ["value", "from_unit", "to_unit"]}, _convert_units),
    ]
    if notes is not None:
        folder = Path(notes).expanduser().resolve()
        if not folder.is_dir():
            raise UserError(f"{notes}: notes folder does not exist")
        tools.append(Tool("search_notes", "Search the user's notes (text files) for lines containing a phrase",
                          {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
                          lambda arguments: "\n".join(search_notes(folder, str(arguments["query"]))) or "no matches"))
    return tools


# --- user tools --------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def command_tool(name: str, description: str, parameters: dict[str, Any], argv: list[str], *,
                 cwd: Path | None = None, timeout: float = 30, origin: str = "") -> Tool:
    """A tool that runs `argv` (no shell): each `{arg}` in an element is replaced by that argument's
    value; an element that is only `{arg}` is left out when the argument is absent."""
    known = set((parameters.get("properties") or {}))
    for element in argv:
        for placeholder in _PLACEHOLDER.findall(element):
            if placeholder not in known:
                raise UserError(f"{origin or name}: command uses {{{placeholder}}}, which is not a declared parameter "
                                f"({', '.join(sorted(known)) or 'none'})")

    def run(arguments: dict[str, Any]) -> str:
        filled: list[str] = []
        for element in argv:
            whole = _PLACEHOLDER.fullmatch(element)
            if whole and whole.group(1) not in arguments:
                continue

            def value(match: re.Match[str]) -> str:
                item = arguments.get(match.group(1), "")
                if isinstance(item, (dict, list)):
                    raise ToolError(f"argument {match.group(1)!r} must be a string or number for a command")
                text = json.dumps(item) if isinstance(item, bool) else str(item)
                if "\x00" in text:
                    raise ToolError(f"argument {match.group(1)!r} contains a NUL character")
                return text

            filled.append(_PLACEHOLDER.sub(value, element))
        try:
            done = subprocess.run(filled, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, shell=False)
        except FileNotFoundError:
            raise ToolError(f"{filled[0]}: program not found") from None
        except subprocess.TimeoutExpired:
            raise ToolError(f"timed out after {timeout:g} s") from None
        if done.returncode != 0:
            raise ToolError(f"exit code {done.returncode}: {(done.stderr or done.stdout).strip()[:500]}")
        return done.stdout.strip()

    return Tool(name, description, parameters, run, origin=origin or "command")


def python_tool(name: str, description: str, parameters: dict[str, Any], target: str, *, origin: str = "") -> Tool:
    """A tool that calls `module:function(**arguments)`."""
    function = load_object(target, origin or name)
    if not callable(function):
        raise UserError(f"{origin or name}: {target} is not callable")
    return Tool(name, description, parameters, lambda arguments: function(**arguments), origin=origin or target)


def load_object(target: str, where: str) -> Any:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise UserError(f"{where}: {target!r} must look like package.module:function")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"{where}: cannot load {target} ({exc})") from None
    return obj


def load_tools_file(path: Path, *, cwd: Path | None = None) -> list[Tool]:
    """Tools declared in a YAML file (see the module docstring)."""
    from ruamel.yaml import YAML, YAMLError

    path = Path(path)
    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such tools file") from None
    except YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    entries = data.get("tools") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise UserError(f"{path}: expected a top-level 'tools:' list")
    tools = []
    for index, entry in enumerate(entries):
        where = f"{path}: tools[{index}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a mapping with name, description, parameters, command or python")
        unknown = set(entry) - {"name", "description", "parameters", "command", "python", "timeout"}
        if unknown:
            raise UserError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        name, parameters = entry.get("name"), entry.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(name, str):
            raise UserError(f"{where}: 'name' (a string) is required")
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise UserError(f"{where}: 'parameters' must be a JSON schema of type object")
        description = str(entry.get("description") or "")
        command, target = entry.get("command"), entry.get("python")
        if (command is None) == (target is None):
            raise UserError(f"{where}: give exactly one of 'command' (an argv list) or 'python' (module:function)")
        if command is not None:
            if isinstance(command, str) or not isinstance(command, list) or not command or \
                    not all(isinstance(item, (str, int, float)) for item in command):
                raise UserError(f"{where}: 'command' must be a list of arguments such as [wc, -m, \"{{path}}\"] "
                                "(a shell string is not accepted)")
            tools.append(command_tool(name, description, parameters, [str(item) for item in command], cwd=cwd,
                                      timeout=float(entry.get("timeout", 30)), origin=where))
        else:
            tools.append(python_tool(name, description, parameters, str(target), origin=where))
    return tools


def entry_point_tools(group: str = "edgezh.tools") -> list[Tool]:
    """Tools from installed packages' entry points in `group`."""
    from importlib.metadata import entry_points

    tools: list[Tool] = []
    for point in entry_points(group=group):
        try:
            obj = point.load()
        except Exception as exc:
            raise UserError(f"entry point {point.name} ({point.value}): cannot load it ({exc})") from None
        if callable(obj) and not isinstance(obj, Tool):
            obj = obj()
        items = [obj] if isinstance(obj, Tool) else list(obj) if isinstance(obj, (list, tuple)) else None
        if items is None or not all(isinstance(item, Tool) for item in items):
            raise UserError(f"entry point {point.name} ({point.value}): must give a Tool or a list of Tools")
        tools.extend(items)
    return tools
