"""Tests mirror the package (tests/sae/ tests src/traitscope/sae/, ...); helpers shared across folders
live beside this file (`locations`, `app_fixtures`), which pytest puts on the import path.

The suite runs on two pytest-xdist workers, a test file to each (pyproject.toml); lines a test adds to
the `summary` fixture are printed at the end of the run, from whichever worker they come."""

import pytest

SUMMARY = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session")
def summary(request) -> list[str]:
    """Lines to print at the end of the run, passed or failed (figures a test measured)."""
    lines: list[str] = []
    yield lines
    if hasattr(request.config, "workeroutput"):  # a pytest-xdist worker: sent to the controller
        request.config.workeroutput["summary"] = lines
    else:
        request.config.stash.setdefault(SUMMARY, []).extend(lines)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """pytest-xdist: a worker is done; keep its summary lines."""
    node.config.stash.setdefault(SUMMARY, []).extend(getattr(node, "workeroutput", {}).get("summary", []))


def pytest_terminal_summary(terminalreporter) -> None:
    for line in terminalreporter.config.stash.get(SUMMARY, []):
        terminalreporter.write_line(line)
