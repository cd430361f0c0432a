"""`traitscope push RUN hf:<owner>/<repo>[/<subfolder>]`: upload a run folder to the Hugging Face hub with
a model card (model, layer, data, metrics) and a SAELens copy of the SAE. Needs a hub token
(`hf auth login` or HF_TOKEN)."""

import argparse
from pathlib import Path

from traitscope.interop.hub import push


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="traitscope run folder")
    parser.add_argument("dest", metavar="hf:OWNER/REPO[/SUBFOLDER]", help="hub repository (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--message", default=None, help="commit message")


def run(args: argparse.Namespace) -> int:
    url = push(Path(args.run), args.dest, private=args.private, message=args.message)
    print(f"pushed {args.run} to {url}")
    return 0
