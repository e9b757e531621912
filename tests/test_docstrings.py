"""The docstrings are the API reference: every public name of igfast (``igfast.__all__``)
has one, so do the public methods of its classes, and every argument of those
functions and methods is named in its docstring."""

import inspect

import pytest

import igfast

def _public_callables():
    for name in igfast.__all__:
        value = getattr(igfast, name)
        if not getattr(value, "__module__", "igfast").startswith("igfast"):
            continue  # Captum's own class, re-exported when Captum is installed
        if inspect.isclass(value):
            yield name, value
            if issubclass(value, BaseException):
                continue
            for method_name, method in vars(value).items():
                if method_name.startswith("_") or not callable(method):
                    continue
                yield f"{name}.{method_name}", method
        elif callable(value):
            yield name, value


def _documented_arguments(function, docstring):
    try:
        signature = inspect.signature(inspect.unwrap(function))
    except (TypeError, ValueError):
        return []
    missing = []
    for parameter in signature.parameters.values():
        if parameter.name in ("self", "cls") or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.name not in docstring:
            missing.append(parameter.name)
    return missing


@pytest.mark.parametrize("name, value", list(_public_callables()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_name_is_documented(name, value):
    docstring = inspect.getdoc(inspect.unwrap(value)) if callable(value) else None
    assert docstring and len(docstring) > 20, f"{name} has no docstring"
    if inspect.isclass(value):
        # A class documents its constructor's arguments.
        init_doc = docstring + (inspect.getdoc(value.__init__) or "")
        missing = _documented_arguments(value.__init__, init_doc) if "__init__" in vars(value) else []
    else:
        missing = _documented_arguments(value, docstring)
    assert not missing, f"{name} does not document its arguments {missing}"
