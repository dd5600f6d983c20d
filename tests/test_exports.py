"""The public names of `aftune`: one list (the TYPE_CHECKING imports of aftune/__init__.py), from which `__all__`
and the lazy loader are read; every name imports and is the object its module defines; `import aftune` alone
loads no torch."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types

import pytest

import aftune


def test_every_public_name_imports_from_where_the_list_says():
    assert aftune.__all__[0] == "__version__" and len(aftune.__all__) == len(set(aftune.__all__)) > 20
    for name in aftune.__all__[1:]:
        obj = getattr(aftune, name)
        module = importlib.import_module(aftune._EXPORTS[name])
        if isinstance(obj, types.ModuleType):
            assert obj is module and obj.__name__ == f"aftune.{name}", name
        else:
            assert obj is getattr(module, name), name
        assert name in dir(aftune)


def test_star_import_and_unknown_names():
    namespace: dict = {}
    exec("from aftune import *", namespace)
    assert set(aftune.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="not_a_name"):
        aftune.not_a_name  # noqa: B018


def test_import_aftune_loads_no_torch():
    code = "import sys, aftune; assert 'AFTTrainer' in aftune.__all__; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
