"""The import graph: each stage imports only lower stages, and no module imports itself through others
(the layers are written in pyproject.toml and explained in src/traitscope/__init__.py)."""

import graphlib
import re
import tomllib

import grimp
import pytest
from importlinter.cli import lint_imports

import traitscope
from locations import REPO


def test_every_import_contract_of_pyproject_is_kept(capsys):
    status = lint_imports(str(REPO / "pyproject.toml"), no_cache=True, no_logo=True)
    assert status == 0, capsys.readouterr().out


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("traitscope")  # imports inside functions count
    imports = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    try:
        graphlib.TopologicalSorter(imports).prepare()
    except graphlib.CycleError as err:
        pytest.fail("import circle: " + " -> ".join(err.args[1]))


def test_the_package_docstring_lists_the_layers_of_pyproject():
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["id"] == "stages")
    listed = [re.split(r"\s{2,}", line.strip())[0] for line in traitscope.__doc__.splitlines() if line.startswith("    ")]
    assert listed == layers
