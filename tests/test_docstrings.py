"""Every runnable example in the library's docstrings runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import diffusers_flat

# every module, in the subpackages too
MODULES = sorted(info.name for info in pkgutil.walk_packages(diffusers_flat.__path__, "diffusers_flat."))


@pytest.mark.parametrize("name", MODULES)
def test_the_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
