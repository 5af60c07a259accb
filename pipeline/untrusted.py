"""Input that comes from a user's files, checked before it is used.

- query strings (``layers[].query``, ``deposits.query``): a whitelist of syntax, with bounds on powers and
  literal sizes, so that a query can select rows but never run code or hang the run;
- YAML: a safe loader that refuses a key given twice and documents over a size or alias-expansion limit;
- names of layers and sources: a pattern that every output can carry;
- :func:`short_repr`: a value in a message, cut short without building its whole repr first.
"""

from __future__ import annotations

import ast
import math
import re
import reprlib
from pathlib import Path

import yaml

from pipeline.errors import ConfigError

__all__ = [
    "NAME_PATTERN",
    "NAME_FIX",
    "BAND_BAD_CHARS",
    "QUERY_FIX",
    "QueryError",
    "safe_query",
    "short_repr",
    "finite",
    "check_name",
    "YAML_MAX_BYTES",
    "YAML_MAX_NODES",
    "YAMLLimitError",
    "load_yaml",
    "yaml_error",
]


# ------------------------------------------------------------------------------------------------
# query strings ('layers[].query', 'deposits.query')
# ------------------------------------------------------------------------------------------------
# pandas ``DataFrame.query`` (engine 'python' without numexpr) evaluates attribute access and calls, so a
# query string could run code. Every query is checked against a whitelist of syntax first: comparisons of
# columns with values, combined with and/or/not (and pandas' & | ~), arithmetic, lists of values.

QUERY_FIX = (
    "only comparisons of columns with values, combined with and/or/not, are allowed, e.g. "
    "\"type == 'chromite' and Cr > 10\" or \"kind in ['a', 'b']\" (quote a column name with spaces in "
    "backticks: `Au ppb` > 5)"
)
_QUERY_CMP = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn)
_QUERY_UNARY = (ast.Not, ast.USub, ast.UAdd, ast.Invert)  # pandas reads ~ as not
# arithmetic, and & | (pandas reads them as and / or)
_QUERY_BINOP = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitAnd, ast.BitOr)
_QUERY_NODES = (
    ast.Expression,
    ast.Compare,
    ast.BoolOp,
    ast.And,
    ast.Or,
    ast.UnaryOp,
    ast.BinOp,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.List,
    ast.Tuple,
    *_QUERY_CMP,
    *_QUERY_UNARY,
    *_QUERY_BINOP,
)
_QUERY_WHAT = {
    ast.Attribute: "attribute access",
    ast.Call: "a function call",
    ast.Subscript: "indexing",
    ast.Lambda: "a lambda",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.NamedExpr: "an assignment (:=)",
    ast.JoinedStr: "an f-string",
    ast.FormattedValue: "an f-string",
    ast.IfExp: "a conditional expression",
    ast.Dict: "a dict",
    ast.Set: "a set",
    ast.Starred: "unpacking (*)",
    ast.Slice: "a slice",
    ast.Is: "'is'",
    ast.IsNot: "'is not'",
    ast.MatMult: "'@'",
    ast.LShift: "'<<'",
    ast.RShift: "'>>'",
    ast.BitXor: "'^'",
    ast.Await: "'await'",
    ast.Yield: "'yield'",
    ast.YieldFrom: "'yield'",
}
_QUERY_MAX_POWER = 1000  # a constant exponent beyond this (2 ** 10 ** 10) would hang the run
_QUERY_MAX_LENGTH = 4000  # characters: a query selects rows; longer ones are refused before parsing
_QUERY_MAX_DIGITS = 100  # an integer literal with more digits than this (or an exponent of a float beyond 1e100)
_QUERY_MAX_STRING = 1000  # characters of a string literal

# names that every output can carry: a Zarr array or group name, a GeoPackage column, a plot title (no
# mathtext '$'), a file name (no '/')
NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,63}"
_NAME_RE = re.compile(NAME_PATTERN)
BAND_BAD_CHARS = re.compile(r"[/\\$`\x00-\x1f\x7f]")
NAME_FIX = "use letters, digits and _ . + - only (at most 64 characters, not starting with . + -), e.g. 'Cr_ppm'"

_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 60, 60, 3, 6, 6
_SHORT.maxtuple = 6


def short_repr(value, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters without building the whole repr first (a config
    value may be a string of megabytes or a structure that YAML aliases make exponentially large)."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def finite(value, what: str, fix: str):
    """``value`` (a number or a sequence of numbers) if every number is finite, else ValueError."""
    vals = value if isinstance(value, (list, tuple)) else (value,)
    bad = [v for v in vals if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what} must be finite, but holds {short_repr(bad[0])}. Fix: {fix}")
    return value


def check_name(value: str, what: str) -> str:
    """``value`` if it matches :data:`NAME_PATTERN`, else ValueError naming it and the fix."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"{what} {short_repr(value)} holds characters that not every output can carry. Fix: {NAME_FIX}"
        )
    return value


class QueryError(ConfigError):
    """A query string uses syntax outside the whitelist (``problem`` and ``fix`` for LayerError)."""

    def __init__(self, query: str, what: str, syntax: bool = False):
        q = short_repr(query)
        self.problem = f"query {q} {what}" if syntax else f"query {q} uses {what}, which is not allowed"
        self.fix = QUERY_FIX
        super().__init__(f"{self.problem}. Fix: {self.fix}")


def _query_source(query: str) -> str:
    """``query`` with pandas' backtick-quoted column names replaced by placeholder identifiers.

    Splits quotes and backticks exactly as pandas does (a quote opens a string that the same quote closes;
    a backtick opens a name that the next single backtick closes, ```` `` ```` escapes one), so the parsed
    text has the structure pandas evaluates. Backslashes, comments, line breaks and '@' are refused here:
    they are where tokenizers disagree, or they reach outside the table (``@name`` reads a Python variable).
    """
    bad = next((c for c in query if c == "\\" or not (c.isprintable() or c == "\t")), None)
    if bad is not None:  # also inside quotes: an escaped quote is where pandas' splitting and Python's differ
        raise QueryError(query, "a backslash" if bad == "\\" else f"the control character {bad!r}")
    out: list[str] = []
    i, n, k = 0, len(query), 0
    while i < n:
        c = query[i]
        if c in "'\"":
            j = query.find(c, i + 1)
            if j < 0:
                raise QueryError(query, f"has an unclosed quote ({c}) at character {i + 1}", syntax=True)
            out.append(query[i : j + 1])
            i = j + 1
            continue
        if c == "`":
            j = i + 1
            while True:
                j = query.find("`", j)
                if j < 0:
                    raise QueryError(query, f"has an unclosed backtick at character {i + 1}", syntax=True)
                if query[j + 1 : j + 2] == "`":  # `` inside a quoted name is one backtick
                    j += 2
                    continue
                break
            out.append(f"_backtick_column_{k}")
            k += 1
            i = j + 1
            continue
        if c == "@":
            raise QueryError(query, "a local variable reference ('@')")
        if c == "#":
            raise QueryError(query, "a comment ('#')")
        out.append(c)
        i += 1
    return "".join(out)


def _query_construct(node: ast.AST) -> str:
    what = next((w for t, w in _QUERY_WHAT.items() if isinstance(node, t)), None) or f"the syntax {type(node).__name__}"
    try:
        text = ast.unparse(node)
    except Exception:
        return what
    if isinstance(node, ast.Attribute):
        text = f".{node.attr}"
    elif isinstance(node, ast.Call):
        func = ast.unparse(node.func)
        text = f"{'...' if len(func) > 40 else ''}{func[-40:]}(...)"
    return f"{what} ({text[:60]!r})" if text else what


def safe_query(query: str) -> str:
    """Return ``query`` if it only selects rows, else raise :class:`QueryError` (one line, with the fix).

    Allowed: column names (bare or in backticks), constants (str, number, bool, None), lists/tuples of
    them, comparisons (== != < <= > >= in, not in), and/or/not (& | ~), unary -/+, arithmetic
    (+ - * / // % **). Refused: attribute access, calls, indexing, '@' references, lambdas, comprehensions,
    ':=', f-strings, dunder names and anything else.
    """
    if not isinstance(query, str):
        raise QueryError(short_repr(query), f"is a {type(query).__name__}, not a string", syntax=True)
    if len(query) > _QUERY_MAX_LENGTH:
        raise QueryError(query, f"is {len(query)} characters long, over the limit of {_QUERY_MAX_LENGTH}", syntax=True)
    source = _query_source(query)
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        detail = getattr(exc, "msg", None) or type(exc).__name__
        raise QueryError(query, f"is not a valid expression ({detail})", syntax=True) from None
    for node in ast.walk(tree):
        if not isinstance(node, _QUERY_NODES):
            raise QueryError(query, _query_construct(node))
        if isinstance(node, ast.Name) and node.id.startswith("__"):
            raise QueryError(query, f"a name starting with '__' ({node.id!r}; such names reach Python internals)")
        if isinstance(node, ast.Constant) and not (
            node.value is None or isinstance(node.value, (str, bool, int, float))
        ):
            raise QueryError(query, f"the constant {short_repr(node.value)}")
        if isinstance(node, ast.Constant) and _huge_literal(node.value):
            raise QueryError(query, f"a literal too large to be a value ({short_repr(node.value, 40)})")
        if (
            isinstance(node, ast.BinOp)
            and not isinstance(node.op, (ast.BitAnd, ast.BitOr))
            and any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in (node.left, node.right))
        ):
            raise QueryError(query, f"arithmetic on a string ({ast.unparse(node)[:60]!r})")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            exp = node.right.operand if isinstance(node.right, ast.UnaryOp) else node.right
            big = (
                isinstance(exp, ast.Constant)
                and isinstance(exp.value, (int, float))
                and abs(exp.value) > _QUERY_MAX_POWER
            )
            # a power of a power on either side ((10**1000)**1000, 2**10**10) grows beyond any column value
            nested = any(
                isinstance(s, ast.BinOp) and isinstance(s.op, ast.Pow)
                for side in (node.left, node.right)
                for s in ast.walk(side)
            )
            if big or nested:
                raise QueryError(query, f"a power with a huge exponent ({ast.unparse(node)[:60]!r})")
    return query


def _huge_literal(value) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, int):
        return value.bit_length() > _QUERY_MAX_DIGITS * 3.33
    if isinstance(value, float):
        return math.isfinite(value) and abs(value) > 10.0**_QUERY_MAX_DIGITS
    return isinstance(value, str) and len(value) > _QUERY_MAX_STRING


# ------------------------------------------------------------------------------------------------
# YAML with limits: a run config is a few KB of plain data
# ------------------------------------------------------------------------------------------------
YAML_MAX_BYTES = 1 << 20
YAML_MAX_NODES = 100_000  # nodes of the document with every alias expanded (a "billion laughs" has 10^9)


class YAMLLimitError(yaml.YAMLError):
    """The document breaks a limit of :func:`load_yaml` (the message says which, and the fix)."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {short_repr(key, 60)} is given twice (lines {first.start_mark.line + 1} and "
                    f"{key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root) -> int:
    """Number of nodes of a composed YAML document with every alias expanded (computed without expanding)."""
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in sizes:
            continue
        kids = (
            [n for pair in node.value for n in pair]
            if isinstance(node, yaml.MappingNode)
            else (node.value if isinstance(node, yaml.SequenceNode) else [])
        )
        if ready:
            sizes[id(node)] = min(1 + sum(sizes.get(id(k), 0) for k in kids), 10 * YAML_MAX_NODES)
            continue
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in sizes)
    return sizes[id(root)]


def load_yaml(path: Path):
    """``path`` parsed as plain-data YAML: no Python tags, no key given twice, at most :data:`YAML_MAX_BYTES`
    bytes and :data:`YAML_MAX_NODES` nodes with aliases expanded. Raises yaml.YAMLError (ConstructorError
    for a duplicate key, :class:`YAMLLimitError` for a limit)."""
    size = path.stat().st_size
    if size > YAML_MAX_BYTES:
        raise YAMLLimitError(
            f"it is {size / 2**20:.1f} MiB, over the limit of {YAML_MAX_BYTES >> 20} MiB for a run config. "
            "Fix: pass the run-config YAML (a few KB), not a data file"
        )
    loader = _StrictLoader(path.read_text())
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_size(node)
        if n > YAML_MAX_NODES:
            raise YAMLLimitError(
                f"its aliases expand it to more than {YAML_MAX_NODES:,} values (an alias bomb?). "
                "Fix: write the values out instead of nesting aliases (*name) of aliases"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def yaml_error(path: Path, exc: Exception) -> str:
    """One line: where the YAML breaks (1-based line and column), what the parser expected, and the line."""
    if isinstance(exc, YAMLLimitError):
        return f"config file {str(path)!r} is refused: {exc}"
    mark = getattr(exc, "problem_mark", None)
    ctx_mark = getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if context and ctx_mark is not None:
        problem = f"{problem} ({context} opened at line {ctx_mark.line + 1}, column {ctx_mark.column + 1})"
    line = ""
    culprit = ctx_mark if (context and ctx_mark is not None) else mark  # an unclosed bracket: where it opened
    if culprit is not None:
        try:
            text = path.read_text().splitlines()[culprit.line].strip()
            line = f"; line {culprit.line + 1} reads {text[:80]!r}" if text else ""
        except (OSError, IndexError, UnicodeDecodeError):
            pass
    if "tag:yaml.org,2002:python/" in str(problem) or "!!python" in str(problem):
        return (
            f"config file {str(path)!r} holds a Python object tag{where}: {problem}{line}. "
            "Fix: remove the !!python tag; configs are plain data, and tags that build Python objects are refused "
            "because they could run code"
        )
    if "is given twice" in str(problem):
        return (
            f"config file {str(path)!r} gives a key twice{where}: {problem}{line}. "
            "Fix: keep one of them (YAML keeps only the last, silently)"
        )
    return (
        f"config file {str(path)!r} is not valid YAML{where}: {problem}{line}. "
        "Fix: correct the syntax there (an unclosed bracket or quote, a missing ': ', or a tab in the indentation "
        "are the usual causes)"
    )
