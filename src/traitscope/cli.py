"""`traitscope` console command: one subcommand per pipeline stage.

Each stage module exposes `add_arguments(parser)` and `run(args) -> int`; this file only wires them,
so adding a command means adding a line to COMMANDS.

Whatever goes wrong ends in one line on stderr: exit 2 for a problem with the input or the machine
(bad value, damaged file, full disk, a second writer), 1 for a bug. `--debug` (or TRAITSCOPE_DEBUG=1)
prints the traceback too.
"""

import argparse
import errno
import importlib
import os
import re
import sys
import traceback

from traitscope.cli_config import ConfigParser
from traitscope.errors import TraitscopeError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "shards": ("traitscope.shards.cli", "run a vision backbone over images and store activations"),
    "train": ("traitscope.train.cli", "train sparse autoencoders on stored activations"),
    "pareto": ("traitscope.features.pareto_cli", "compare runs on sparsity vs reconstruction error"),
    "inference": ("traitscope.features.cli", "compute every feature's activations over a dataset"),
    "align": ("traitscope.features.align_cli", "score features against known trait labels"),
    "match": ("traitscope.features.match_cli", "pair the features of two SAEs on the same model and layer"),
    "export-features": ("traitscope.features.export_cli",
                        "per-image feature values (max, mean, peak patch and position) as CSV / Parquet"),
    "app": ("traitscope.app.cli", "browse features in a web app"),
    "ratings": ("traitscope.app.ratings_cli", "summarise a saved blind-test ratings file"),
    "finetune": ("traitscope.finetune.cli", "contrastive + orientation fine-tuning of a backbone"),
    "grids": ("traitscope.finetune.grids_cli", "4x4 grids of top images per dimension / feature"),
    "demo": ("traitscope.demo.cli", "the whole workflow on an embedded default, with a report"),
    "import": ("traitscope.interop.import_cli", "turn a saev, SAELens or sparsify SAE into a run folder"),
    "export": ("traitscope.interop.export_cli", "write a run's SAE as a SAELens or sparsify folder"),
    "pull": ("traitscope.interop.pull_cli", "get an SAE from the Hugging Face hub (as a run folder with --out)"),
    "push": ("traitscope.interop.push_cli", "upload a run folder to the Hugging Face hub with a model card"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported, so start-up stays quick and one stage cannot break another."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the Python traceback of an error (or set TRAITSCOPE_DEBUG=1)")
    parser = argparse.ArgumentParser(prog="traitscope", description=__doc__.splitlines()[0], parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ConfigParser)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[debug])
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser(command if command in COMMANDS else None).parse_args(argv)
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
