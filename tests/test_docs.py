"""The usage examples in the docstrings run and print what they say.

Every module of `bilaf_jax` and `train` is searched for `>>>` examples; each module's examples
run in a fresh namespace with `doctest`, as `python -m doctest` would.
"""

import doctest
import importlib
import pkgutil

import pytest

import bilaf_jax
import train


def _modules():
    names = []
    for package in (bilaf_jax, train):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            names.append(info.name)
    return sorted(names)


def _examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    # Only docstrings defined in this module: re-exports are tested where they live.
    return [t for t in finder.find(module) if t.examples and (
        t.filename is None or t.filename == getattr(module, "__file__", None))]


MODULES = [name for name in _modules() if _examples(name)]


def test_there_are_examples_to_run():
    # The public stages carry examples; losing them all would make this file test nothing.
    for name in ("bilaf_jax.activeft", "bilaf_jax.boundary", "bilaf_jax.pipeline",
                 "bilaf_jax.sweep", "train.linear", "train.knn"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in _examples(name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
