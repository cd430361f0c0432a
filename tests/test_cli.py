"""The `traitscope` command's wiring (traitscope.cli): its subcommands come from the entry-point group
traitscope.commands, the top-level help imports no stage, and stale installed metadata is one error line."""

import subprocess
import sys
import tomllib
from importlib.metadata import entry_points

import pytest

from traitscope import cli
from locations import REPO


def test_each_command_of_pyproject_is_installed_with_a_help_line_and_shows_its_options(capsys):
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][cli.COMMAND_GROUP]
    assert list(declared) == list(cli.HELP)  # `traitscope --help` lists them in pyproject's order
    installed = cli.commands()
    assert {name: installed[name].value for name in declared} == declared  # else: pip install -e . again
    for name in declared:
        assert cli.main([name, "--help"]) == 0
        assert capsys.readouterr().out.startswith(f"usage: traitscope {name} ")


def test_the_command_list_imports_no_stage():
    code = "import sys\nfrom traitscope.cli import main\nmain(['--help'])\nprint('torch' in sys.modules, file=sys.stderr)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert all(f"    {name}" in proc.stdout for name in cli.HELP)
    assert proc.stderr.strip() == "False"


@pytest.mark.parametrize("command", ["train", "inference", "shards", "pull"])
def test_a_stage_that_fits_nothing_imports_neither_scikit_learn_nor_matplotlib(command):
    """They take 2.5 s to import together: a bad value to `train` is answered in 2 s instead of 5."""
    code = (f"import sys\nfrom traitscope.cli import commands\ncommands()[{command!r}].load()\n"
            "print(sorted(m for m in ('sklearn', 'matplotlib') if m in sys.modules), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr[-2000:]


def test_metadata_installed_before_a_command_existed_is_one_error_line(monkeypatch, capsys):
    older = [ep for ep in entry_points(group=cli.COMMAND_GROUP) if ep.name != "match"]
    monkeypatch.setattr(cli, "entry_points", lambda group: older)
    assert cli.main(["train", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lacks the command(s) match" in err and "pip install -e ." in err


@pytest.mark.parametrize("argv", [["no-such-command"], []])
def test_an_unknown_or_missing_command_is_an_argparse_error(argv, capsys):
    assert cli.main(argv) == 2
    assert "error:" in capsys.readouterr().err
