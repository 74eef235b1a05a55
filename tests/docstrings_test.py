"""Every public function documents its arguments and result; docstring examples run."""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import kdq

PACKAGES = ["kdq.quant", "kdq.distill", "kdq.prune", "kdq.data", "kdq.models", "kdq.train"]
MODULES = [
    "kdq.checkpoint",
    "kdq.generate",
    "kdq.kv_quant",
    "kdq.report",
    "kdq.rules",
    "kdq.sharding",
    "kdq.tasks",
]


def _public_callables():
    for name in PACKAGES:
        package = importlib.import_module(name)
        for attr in package.__all__:
            yield f"{name}.{attr}", getattr(package, attr)
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if not attr.startswith("_") and getattr(value, "__module__", None) == name:
                yield f"{name}.{attr}", value


def _functions():
    for name, value in _public_callables():
        if inspect.isfunction(value):
            yield name, value


@pytest.mark.parametrize(
    ("name", "value"), list(_public_callables()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_public_api_has_a_docstring(name, value):
    assert inspect.getdoc(value), f"{name} has no docstring"


@pytest.mark.parametrize(
    ("name", "function"), list(_functions()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_functions_document_args_and_returns(name, function):
    doc = inspect.getdoc(function)
    parameters = [
        p for p in inspect.signature(function).parameters.values() if p.name not in ("self", "cls")
    ]
    if parameters:
        assert "Args:" in doc, f"{name} does not document its arguments (Args:)"
    returns = inspect.signature(function).return_annotation
    if returns not in (None, "None", inspect.Signature.empty):
        assert "Returns:" in doc or "Yields:" in doc, (
            f"{name} does not document its result (Returns:)"
        )


def test_docstring_examples_run():
    failures, attempted = 0, 0
    for module_info in pkgutil.walk_packages(kdq.__path__, "kdq."):
        module = importlib.import_module(module_info.name)
        result = doctest.testmod(
            module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        )
        failures += result.failed
        attempted += result.attempted
    assert failures == 0
    assert attempted > 0, "no docstring example was run"
