"""`traitscope finetune`: contrastive + orientation fine-tuning of a backbone on an image folder, and
optionally its image-level embeddings as shards.

    traitscope finetune --images faces/ --model resnet18 --out ft/ [--embed-out shards/ --normalize]

The result loads as a backbone everywhere a model name is taken: `--model finetuned:ft/`. Rerunning
the same command resumes from the last checkpoint; with more --epochs it trains on.
"""

import argparse
import contextlib
import sys

from traitscope.backbones.registry import load_backbone
from traitscope.cli_config import add_config
from traitscope.finetune.model import PREFIX
from traitscope.finetune.trainer import FinetuneConfig, finetune


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True,
                        help="image folder (searched recursively, used in sorted path order) or any image source spec")
    parser.add_argument("--out", required=True, help="output folder: weights, finetune.json, checkpoint, metrics")
    add_config(parser, FinetuneConfig, dest="cfg")  # its augment field: the AugmentConfig options
    embed = parser.add_argument_group("embeddings", "after training, write image-level embeddings as shards")
    embed.add_argument("--embed-out", metavar="DIR",
                       help="write the embedding e(x) of every image (CLS / pooled row of the last layer) as a "
                            "shard folder under DIR (for `traitscope train --tokens cls`)")
    embed.add_argument("--labels", help="labels for the embedded images: 'folders', a CSV, or a CelebA attribute file")
    embed.add_argument("--normalize", action="store_true",
                       help="L2-normalise each embedding (written as a derived folder; recorded in its manifest)")
    embed.add_argument("--embed-batch-size", type=int, default=64, metavar="N", help="images per forward pass (default: 64)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Messages go to stderr; stdout gets the folder written (the shard folder with --embed-out), so
    `SHARDS=$(traitscope finetune ... --embed-out shards/)` works in a script."""
    from traitscope.finetune.embed import embed_images
    from traitscope.images import open_source

    cfg = args.cfg
    result = finetune(cfg, args.images, args.out, verbose=not args.quiet)
    print(f"fine-tuned model: {result.dpath} (use it as --model {PREFIX}{result.dpath})", file=sys.stderr)
    if not args.embed_out:
        print(result.dpath)
        return 0
    backbone = load_backbone(PREFIX + str(result.dpath), device=_device(cfg))
    source = open_source(args.images, labels=args.labels)
    with contextlib.redirect_stdout(sys.stderr):  # the shards pipeline's messages
        shards = embed_images(backbone, source, args.embed_out, layer=backbone.embed_layer, normalize=args.normalize,
                              batch_size=args.embed_batch_size, verbose=not args.quiet)
    kind = "L2-normalised embeddings" if args.normalize else "embeddings"
    print(f"{kind} of {shards.n_images} images (layer {backbone.embed_layer}, "
          f"{shards.d_model(backbone.embed_layer)} wide): {shards.dpath}", file=sys.stderr)
    print(shards.dpath)
    return 0


def _device(cfg: FinetuneConfig) -> str:
    from traitscope.finetune.trainer import resolve_device

    return str(resolve_device(cfg.device))
