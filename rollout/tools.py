"""Tools the model may call, and the parser for hermes-style calls in its output.

Tools are plain Python functions registered by name; each call runs with a timeout and any error
becomes text for the model, never an exception in the rollout loop. The two built-ins evaluate
expressions with a small ast interpreter (no eval/exec): `calculator` does arithmetic only,
`python` adds comparisons, containers, comprehension-free builtins and `math` functions. Both
bound integer sizes and sequence lengths, so a call cannot hang the process.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass
class ToolCall:
    name: str | None
    arguments: dict
    error: str | None = None  # set when the call text could not be parsed
    raw: str = ""


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in `text`, malformed ones
    included (with `error` set) so the model can be told what was wrong."""
    calls = []
    for m in TOOL_CALL_RE.finditer(text):
        raw = m.group(1).strip()
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            calls.append(ToolCall(None, {}, f"tool call is not valid JSON ({e.msg} at char {e.pos})", raw))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ToolCall(None, {}, 'tool call must be an object {"name": str, "arguments": object}', raw))
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models emit arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(ToolCall(obj["name"], {}, "tool call `arguments` must be a JSON object", raw))
            continue
        calls.append(ToolCall(obj["name"], args, None, raw))
    return calls


# ---- the restricted expression evaluator ----------------------------------------------------
MAX_INT_BITS = 4096
MAX_SEQ_LEN = 100_000

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_}
_CMP = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
        ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}


def _bounded_range(*args):
    r = range(*args)
    if len(r) > MAX_SEQ_LEN:
        raise ValueError(f"range longer than {MAX_SEQ_LEN}")
    return r


def _small_args(fn, limit: int = 10_000):
    """Guard functions whose cost explodes with their argument (factorial(10**8) runs in C for minutes)."""
    def guarded(*args):
        if any(isinstance(a, int) and abs(a) > limit for a in args):
            raise ValueError(f"{fn.__name__} arguments must be at most {limit}")
        return fn(*args)
    guarded.__name__ = fn.__name__
    return guarded


PY_FUNCS = {"abs": abs, "min": min, "max": max, "sum": sum, "len": len, "round": round, "int": int, "float": float,
            "str": str, "bool": bool, "list": list, "tuple": tuple, "set": set, "sorted": sorted, "reversed": reversed,
            "range": _bounded_range, "pow": None, "divmod": divmod, "all": all, "any": any,
            **{k: getattr(math, k) for k in ("sqrt", "exp", "log", "log2", "log10", "sin", "cos", "tan", "asin", "acos",
                                            "atan", "floor", "ceil", "factorial", "gcd", "lcm", "comb", "perm",
                                            "isqrt", "fabs", "hypot", "degrees", "radians")},
            **{k: _small_args(getattr(math, k)) for k in ("factorial", "comb", "perm")}}
PY_NAMES = {"pi": math.pi, "e": math.e, "True": True, "False": False, "None": None, "inf": math.inf}
CALC_FUNCS = {k: PY_FUNCS[k] for k in ("abs", "min", "max", "round", "sqrt", "exp", "log", "log2", "log10", "sin",
                                       "cos", "tan", "floor", "ceil", "factorial", "gcd", "comb", "perm")}
CALC_NAMES = {"pi": math.pi, "e": math.e}


class _Evaluator:
    def __init__(self, funcs: dict, names: dict, arithmetic_only: bool, deadline: float):
        self.funcs, self.names, self.arith, self.deadline = funcs, names, arithmetic_only, deadline

    def check(self, v):
        if isinstance(v, int) and v.bit_length() > MAX_INT_BITS:
            raise ValueError(f"integer result larger than {MAX_INT_BITS} bits")
        if isinstance(v, (str, list, tuple, set, dict)) and len(v) > MAX_SEQ_LEN:
            raise ValueError(f"result longer than {MAX_SEQ_LEN}")
        return v

    def ev(self, node):
        if time.monotonic() > self.deadline:
            raise TimeoutError("expression took too long")
        if isinstance(node, ast.Expression):
            return self.ev(node.body)
        if isinstance(node, ast.Constant):
            if self.arith and not isinstance(node.value, (int, float)):
                raise ValueError(f"only numbers are allowed, got {node.value!r}")
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = self.ev(node.left), self.ev(node.right)
            if isinstance(node.op, ast.Pow) and isinstance(b, (int, float)) and abs(b) > 10_000:
                raise ValueError("exponent too large")
            if isinstance(node.op, ast.Mult):  # bound "x" * 10**9 before building it
                seq, n = (a, b) if isinstance(a, (str, list, tuple)) else (b, a)
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_SEQ_LEN:
                    raise ValueError(f"result longer than {MAX_SEQ_LEN}")
            return self.check(_BINOPS[type(node.op)](a, b))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            if self.arith and isinstance(node.op, ast.Not):
                raise ValueError("`not` is not arithmetic")
            return _UNARY[type(node.op)](self.ev(node.operand))
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return self.names[node.id]
            raise ValueError(f"unknown name {node.id!r}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            fn = self.funcs.get(node.func.id) or (pow if node.func.id == "pow" and not self.arith else None)
            if fn is None:
                raise ValueError(f"function {node.func.id!r} is not allowed; allowed: {sorted(self.funcs)}")
            args = [self.ev(a) for a in node.args]
            if fn is pow and len(args) >= 2 and abs(args[1]) > 10_000 and len(args) == 2:
                raise ValueError("exponent too large")
            return self.check(fn(*args))
        if not self.arith:
            if isinstance(node, ast.Compare):
                if any(type(op) not in _CMP for op in node.ops):
                    return self._bad(node)
                left = self.ev(node.left)
                for op, right in zip(node.ops, node.comparators):
                    r = self.ev(right)
                    if not _CMP[type(op)](left, r):
                        return False
                    left = r
                return True
            if isinstance(node, ast.BoolOp):
                vals = [self.ev(v) for v in node.values]
                return all(vals) if isinstance(node.op, ast.And) else any(vals)
            if isinstance(node, ast.IfExp):
                return self.ev(node.body) if self.ev(node.test) else self.ev(node.orelse)
            if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
                vals = [self.ev(e) for e in node.elts]
                return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](vals)
            if isinstance(node, ast.Dict):
                return {self.ev(k): self.ev(v) for k, v in zip(node.keys, node.values)}
            if isinstance(node, ast.Subscript):
                base = self.ev(node.value)
                if isinstance(node.slice, ast.Slice):
                    s = node.slice
                    return base[slice(*(None if x is None else self.ev(x) for x in (s.lower, s.upper, s.step)))]
                return base[self.ev(node.slice)]
        return self._bad(node)

    def _bad(self, node):
        raise ValueError(f"{type(node).__name__} is not allowed in this tool")


def safe_eval(expression: str, *, arithmetic_only: bool, timeout_s: float = 2.0):
    if not isinstance(expression, str) or len(expression) > 2000:
        raise ValueError("expression must be a string of at most 2000 characters")
    tree = ast.parse(expression.strip(), mode="eval")
    funcs, names = (CALC_FUNCS, CALC_NAMES) if arithmetic_only else ({k: v for k, v in PY_FUNCS.items() if v}, PY_NAMES)
    return _Evaluator(funcs, names, arithmetic_only, time.monotonic() + timeout_s).ev(tree)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses, sqrt/log/... ."""
    return repr(safe_eval(expression, arithmetic_only=True))


def python(expression: str) -> str:
    """Evaluate one Python expression in a restricted interpreter (no imports, attributes, assignment)."""
    return repr(safe_eval(expression, arithmetic_only=False))


# ---- registry ----------------------------------------------------------------------------------
@dataclass
class Tool:
    fn: Callable[..., str]
    timeout_s: float = 5.0
    description: str = ""
    parameters: dict = field(default_factory=dict)  # JSON schema of the arguments, shown to the template

    def schema(self, name: str) -> dict:
        return {"type": "function", "function": {"name": name, "description": self.description,
                                                 "parameters": self.parameters}}


class ToolRegistry:
    def __init__(self):
        self.tools: dict[str, Tool] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tool")

    def register(self, name: str, fn: Callable[..., str], *, timeout_s: float = 5.0, description: str | None = None,
                 parameters: dict | None = None) -> None:
        self.tools[name] = Tool(fn, timeout_s, description or (fn.__doc__ or "").strip(), parameters or {})

    def schemas(self) -> list[dict]:
        return [t.schema(n) for n, t in self.tools.items()]

    def call(self, call: ToolCall) -> tuple[str, bool]:
        """(text for the model, ok). Errors of any kind come back as 'Error: ...' text."""
        if call.error:
            return f"Error: {call.error}", False
        tool = self.tools.get(call.name)
        if tool is None:
            return f"Error: unknown tool {call.name!r}; available tools: {sorted(self.tools)}", False
        fut = self._pool.submit(tool.fn, **call.arguments)
        try:
            return str(fut.result(timeout=tool.timeout_s)), True
        except FutureTimeout:
            return f"Error: tool {call.name!r} timed out after {tool.timeout_s} s", False
        except TypeError as e:
            return f"Error: bad arguments for {call.name!r}: {e}", False
        except Exception as e:
            return f"Error: {type(e).__name__}: {e}", False


def default_tools(timeout_s: float = 2.0) -> ToolRegistry:
    reg = ToolRegistry()
    expr = {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}
    reg.register("calculator", calculator, timeout_s=timeout_s, parameters=expr)
    reg.register("python", python, timeout_s=timeout_s, parameters=expr)
    return reg
