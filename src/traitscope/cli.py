"""`traitscope` console command: one subcommand per pipeline stage.

Each stage module exposes `add_arguments(parser)` and `run(args) -> int`; this file only wires them,
so adding a command means adding a line to COMMANDS.
"""

import argparse
import importlib
import sys

from traitscope.errors import TraitscopeError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "shards": ("traitscope.shards.cli", "run a vision backbone over images and store activations"),
    "train": ("traitscope.train.cli", "train sparse autoencoders on stored activations"),
    "pareto": ("traitscope.features.pareto_cli", "compare runs on sparsity vs reconstruction error"),
    "inference": ("traitscope.features.cli", "compute every feature's activations over a dataset"),
    "align": ("traitscope.features.align_cli", "score features against known trait labels"),
    "app": ("traitscope.app.cli", "browse features in a web app"),
    "ratings": ("traitscope.app.ratings_cli", "summarise a saved blind-test ratings file"),
    "finetune": ("traitscope.finetune.cli", "contrastive + orientation fine-tuning of a backbone"),
    "grids": ("traitscope.finetune.grids_cli", "4x4 grids of top images per dimension / feature"),
    "demo": ("traitscope.demo.cli", "the whole workflow on an embedded default, with a report"),
    "import": ("traitscope.interop.import_cli", "turn a saev, SAELens or sparsify SAE into a run folder"),
    "export": ("traitscope.interop.export_cli", "write a run's SAE as a SAELens or sparsify folder"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported, so start-up stays quick and one stage cannot break another."""
    parser = argparse.ArgumentParser(prog="traitscope", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except TraitscopeError as err:
        say(f"traitscope {args.command}: error: {err}")
        return 2
    except KeyboardInterrupt:
        say(f"traitscope {args.command}: interrupted; finished work is kept, rerun to resume")
        return 130
    except OSError as err:
        if err.errno == 28:  # ENOSPC
            say(f"traitscope {args.command}: error: disk full while writing {err.filename or ''}; "
                "finished work is kept, free space and rerun to resume")
            return 2
        raise


def say(line: str) -> None:
    """One line on stderr in a single write, so the lines of processes sharing it never interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
