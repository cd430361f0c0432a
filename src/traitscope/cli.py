"""`traitscope` console command: one subcommand per pipeline stage.

Each command is a module with `add_arguments(parser)` and `run(args) -> int`, named in the entry-point
group `traitscope.commands` of pyproject.toml; this file only wires them. Adding a command means adding
its module, its line in that group and its one-line help in HELP (kept here so that `traitscope --help`
imports no stage, hence no torch). Another package can add a command through the same group.

Whatever goes wrong ends in one line on stderr: exit 2 for a problem with the input or the machine
(bad value, damaged file, full disk, a second writer), 1 for a bug. `--debug` (or TRAITSCOPE_DEBUG=1)
prints the traceback too.
"""

import argparse
import errno
import os
import re
import sys
import traceback
from importlib.metadata import EntryPoint, entry_points

from traitscope.cli_config import ConfigParser
from traitscope.errors import TraitscopeError

COMMAND_GROUP = "traitscope.commands"
"""The entry-point group that names each subcommand's module (pyproject.toml)."""

HELP: dict[str, str] = {
    "shards": "run a vision backbone over images and store activations",
    "train": "train sparse autoencoders on stored activations",
    "pareto": "compare runs on sparsity vs reconstruction error",
    "inference": "compute every feature's activations over a dataset",
    "align": "score features against known trait labels",
    "match": "pair the features of two SAEs on the same model and layer",
    "export-features": "per-image feature values (max, mean, peak patch and position) as CSV / Parquet",
    "app": "browse features in a web app",
    "ratings": "summarise a saved blind-test ratings file",
    "finetune": "contrastive + orientation fine-tuning of a backbone",
    "grids": "4x4 grids of top images per dimension / feature",
    "demo": "the whole workflow on an embedded default, with a report",
    "import": "turn a saev, SAELens or sparsify SAE into a run folder",
    "export": "write a run's SAE as a SAELens or sparsify folder",
    "pull": "get an SAE from the Hugging Face hub (as a run folder with --out)",
    "push": "upload a run folder to the Hugging Face hub with a model card",
}
"""Each command's one-line help, in the order `traitscope --help` lists them."""


def commands() -> dict[str, EntryPoint]:
    """The installed commands, in HELP's order (then any other package's); refused when the installed
    metadata predates one of ours (an install made before the command was added)."""
    found = {ep.name: ep for ep in entry_points(group=COMMAND_GROUP)}
    if missing := [name for name in HELP if name not in found]:
        raise TraitscopeError(f"traitscope's installed metadata lacks the command(s) {', '.join(missing)} (entry-point "
                              f"group {COMMAND_GROUP}); reinstall it, e.g. `pip install -e .` in its source folder")
    return {name: found[name] for name in [*HELP, *sorted(found.keys() - HELP.keys())]}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported, so start-up stays quick and one stage cannot break another."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the Python traceback of an error (or set TRAITSCOPE_DEBUG=1)")
    parser = argparse.ArgumentParser(prog="traitscope", description=__doc__.splitlines()[0], parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ConfigParser)
    for name, entry in commands().items():
        p = sub.add_parser(name, help=HELP.get(name), description=HELP.get(name), parents=[debug])
        if name == command:
            module = entry.load()
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command)
    except TraitscopeError as err:
        say(f"traitscope: error: {err}")
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a bad option (argparse printed one `error:` line)
        return int(done.code or 0)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        say(f"traitscope {args.command}: interrupted; finished work is kept, rerun to resume")
        return 130
    except Exception as err:
        if getattr(args, "debug", False) or os.environ.get("TRAITSCOPE_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        line, code = describe_error(err)
        say(f"traitscope {args.command}: error: {' '.join(line.split())}")
        return code


def describe_error(err: BaseException) -> tuple[str, int]:
    """One line for an error, and the exit code: 2 for the user's input or machine, 1 for a bug."""
    if isinstance(err, TraitscopeError):
        return str(err), 2
    for cause in _chain(err):  # a full disk, whoever wrote (numpy, safetensors' Rust writer, PIL...)
        code = getattr(cause, "errno", None)
        if code is None and (found := re.search(r"\(os error (\d+)\)", str(cause))):
            code = int(found.group(1))
        if code is None and re.search(r"\d+ requested and \d+ written|file write failed", str(cause)):
            code = errno.ENOSPC  # numpy's tofile and torch.save report a short write without an errno
        if code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            where = getattr(cause, "filename", None) or getattr(err, "filename", None)
            full = "disk full" if code == errno.ENOSPC else os.strerror(code).lower()
            return (f"{full}{f' while writing {where}' if where else ''}; finished work is kept, "
                    "free space and rerun to resume"), 2
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror}", 2
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return "out of memory; use a smaller --batch-size or fewer workers", 2
    return (f"unexpected {type(err).__name__}: {err} (a bug: rerun with --debug for the traceback and "
            "please report it)"), 1


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def say(line: str) -> None:
    """One line on stderr in a single write, so the lines of processes sharing it never interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
