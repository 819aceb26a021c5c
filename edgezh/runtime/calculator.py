"""A calculator that evaluates arithmetic by walking Python's AST: numbers, + - * / // % **,
parentheses, and a fixed table of math functions and constants. Nothing else is allowed (no
names outside the table, no attributes, no calls of anything else, no eval), and sizes are
bounded so that `9**9**9` is refused instead of freezing the chat."""

from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable

MAX_LENGTH = 500
MAX_EXPONENT = 10_000
MAX_MAGNITUDE = 1e300


class CalculatorError(ValueError):
    """The expression is not arithmetic the calculator allows, or it overflows."""


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "cbrt": lambda x: math.copysign(abs(x) ** (1 / 3), x), "exp": math.exp,
    "log": math.log, "ln": math.log, "log10": math.log10, "log2": math.log2,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos, "atan": math.atan,
    "degrees": math.degrees, "radians": math.radians, "abs": abs, "round": round, "floor": math.floor,
    "ceil": math.ceil, "min": min, "max": max, "factorial": math.factorial, "gcd": math.gcd,
}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
# Full-width characters a Chinese keyboard types, and the usual multiplication/division signs.
_NORMALIZE = str.maketrans({"（": "(", "）": ")", "×": "*", "÷": "/", "＋": "+", "－": "-", "＊": "*", "／": "/",
                            "，": ",", "＾": "**", "^": "**", "−": "-"})


def evaluate(expression: str) -> int | float:
    """The value of `expression`, or CalculatorError saying what is not allowed."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("empty expression")
    text = expression.translate(_NORMALIZE).strip()
    if len(text) > MAX_LENGTH:
        raise CalculatorError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from None
    try:
        value = _eval(tree.body)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result too large") from None
    except (ValueError, TypeError) as exc:
        if isinstance(exc, CalculatorError):
            raise
        raise CalculatorError(f"math error: {exc}") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return int(value)
    return value


def _check(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalculatorError("only numbers are allowed")
    if isinstance(value, int) and value.bit_length() > 1000 or isinstance(value, float) and abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("result too large")
    return value


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return _check(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent larger than {MAX_EXPONENT}")
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int) and right > 0 \
                and left.bit_length() * right > 4000:
            raise CalculatorError("result too large")
        return _check(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise CalculatorError(f"unknown name {node.id!r} (constants: {', '.join(_CONSTANTS)})")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        if node.keywords or len(node.args) > 8:
            raise CalculatorError(f"{node.func.id}() takes only a few positional arguments")
        args = [_eval(arg) for arg in node.args]
        if node.func.id == "factorial" and args and args[0] > 500:
            raise CalculatorError("factorial argument larger than 500")
        return _check(_FUNCTIONS[node.func.id](*args))
    if isinstance(node, ast.Call):
        raise CalculatorError(f"unknown function (allowed: {', '.join(sorted(_FUNCTIONS))})")
    raise CalculatorError(f"{type(node).__name__} is not allowed in a calculation")
