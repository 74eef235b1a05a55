"""Readability limits of the package: short functions and a short run loop."""

import ast
import pathlib

KDQ = pathlib.Path(__file__).resolve().parents[1] / "kdq"
MAX_FUNCTION_LINES = 60
MAX_LOOP_LINES = 250


def _code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end of the function."""
    body = function.body
    has_docstring = (
        isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    )
    statements = body[1:] if has_docstring else body
    if not statements:
        return 0
    return function.end_lineno - statements[0].lineno + 1


def _long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    tree = ast.parse(source)
    return [
        (node.name, _code_lines(node))
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _code_lines(node) > limit
    ]


def test_the_line_counter_counts_code_not_docstrings():
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    long = f'def f():\n    """Doc.\n\n    More.\n    """\n{body}\n'
    assert _long_functions(long, MAX_FUNCTION_LINES) == [("f", 61)]
    short = 'def g():\n    """' + "\n" * 80 + '    """\n    return 1\n'
    assert _long_functions(short, MAX_FUNCTION_LINES) == []


def test_no_function_in_kdq_is_longer_than_60_lines():
    offenders = {
        f"{path.relative_to(KDQ.parent)}:{name}": lines
        for path in sorted(KDQ.rglob("*.py"))
        for name, lines in _long_functions(path.read_text(), MAX_FUNCTION_LINES)
    }
    assert offenders == {}


def test_the_run_loop_stays_short():
    lines = len((KDQ / "train" / "loop.py").read_text().splitlines())
    assert lines <= MAX_LOOP_LINES
