"""`traitscope shards`: run a vision backbone over images and store its activations.

    traitscope shards --images photos/ --model dinov2-vits14-reg --layers -2 --out shards/

The last line of stdout is the shard folder (written now or found already complete), so a script can
take it with `tail -n 1`. A progress bar goes to stderr.

On several GPUs or machines, launch the same command with torchrun (see docs/distributed.md):

    torchrun --standalone --nproc-per-node 8 -m traitscope.cli shards --images photos/ --out shards/

Each process runs the model on its own GPU over its share of the shards; rank 0 prints and writes the
manifest. The folder is the same as a one-process run's.
"""

import argparse
import os

from traitscope import dist
from traitscope.errors import TraitscopeError
from traitscope.files import check_out_dpath
from traitscope.backbones.base import DEFAULT_GEOMETRY, GEOMETRIES
from traitscope.shards.store import TOKEN_KINDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", default="synthetic", metavar="SOURCE",
                        help="a folder of images (searched recursively), 'hf:<dataset>[:split]', or "
                             "'synthetic[:N[:SEED]]' for the built-in synthetic trait set (default: synthetic)")
    parser.add_argument("--labels", default=None, metavar="LABELS",
                        help="per-image labels: 'folders' (first subfolder is the class) or a CSV / CelebA "
                             "attribute file")
    parser.add_argument("--masks", default=None, metavar="DIR",
                        help="folder of per-pixel masks, one PNG per image at the same relative path, holding ids (or "
                             "colours) that its labels.json, labels.txt or class_dict.csv names; stored as per-patch labels")
    parser.add_argument("--model", default=None,
                        help="backbone name, 'hf:<id>', 'timm:<name>', ... (default: DINOv2 ViT-S/14 with registers "
                             "from the Hugging Face hub, or the offline DINOv2-S when the hub cannot be reached)")
    parser.add_argument("--geometry", default=DEFAULT_GEOMETRY, choices=GEOMETRIES,
                        help="how each image becomes the model's input. grid (default): the whole image, aspect "
                             "kept, in a patch grid shaped like the collection's median aspect ratio (e.g. 9x29 "
                             "patches for long fish), padded where an image differs; letterbox: the whole image, "
                             "aspect kept, padded to the model's square; squash: the whole image stretched to the "
                             "square; center-crop: the model's own resize and centre crop (the middle square only: "
                             "a quarter of a long fish). The default shows every pixel undistorted, because "
                             "specimens are often long or tall and a trait the model never saw cannot be found. "
                             "Padding patches are never trained on, counted or drawn")
    parser.add_argument("--resolution", type=int, default=None, metavar="PX",
                        help="side of the model's square input in pixels, a multiple of its patch size (default: the "
                             "model's own, 224 for most); under grid the grid has about as many patches as that "
                             "square. Every transformer family (transformers, timm, open_clip, the offline DINOv2) "
                             "interpolates its position embeddings to other sizes; DINOv2 was trained up to 518")
    parser.add_argument("--layers", nargs="+", default=["-2"], metavar="L",
                        help="blocks to record, comma- or space-separated; negative counts from the end "
                             "(default: -2, the second-to-last block). Write '--layers=-2,-1' or '--layers -2 -1'")
    parser.add_argument("--tokens", default="patches,cls", metavar="KINDS",
                        help="token kinds to store: patches, cls, or both (default: patches,cls)")
    parser.add_argument("--out", default="shards", metavar="DIR",
                        help="where the content-addressed shard folder goes (default: ./shards)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                        help="storage precision (default: float16; values beyond its range are clamped and reported)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per forward pass (default: 128 on a GPU, 32 on the CPU)")
    parser.add_argument("--images-per-shard", type=int, default=1024, metavar="N",
                        help="images per shard file; an interrupted run resumes at a shard boundary (default: 1024)")
    parser.add_argument("--device", default="auto", choices=dist.DEVICE_CHOICES,
                        help="where the model runs: auto (default) picks cuda, else mps, else cpu; under torchrun "
                             "each process takes the GPU of its LOCAL_RANK")
    parser.add_argument("--workers", type=int, default=None,
                        help="workers decoding and preprocessing images (default: the CPU cores, shared among the "
                             "processes on the machine, at most 16)")
    parser.add_argument("--decode-workers", default="processes", choices=["processes", "threads"],
                        help="what the workers are: processes (default; forked, on Linux) or threads of this process")
    parser.add_argument("--decode", default="full", choices=["full", "draft", "device"],
                        help="full (default): decode every pixel; draft: decode JPEGs at 1/2, 1/4 or 1/8 scale "
                             "where the model's input is that much smaller (about 3x faster on 3000-px photos; "
                             "the model's input differs from full decoding by about 0.4/255 per pixel on average). "
                             "device: decode JPEGs where the model runs, in batches (nvJPEG on a CUDA GPU, via "
                             "torchvision), resized by torch (pixels differ slightly from Pillow's). "
                             "The manifest records it, and it names a different shard folder")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first unreadable image instead of skipping it")
    parser.add_argument("--verify", metavar="DIR", default=None,
                        help="only check the shard folder DIR: every file against the sha256 in its manifest (a "
                             "rerun that finds its folder complete does this too, and recomputes what is damaged)")


def parse_layers(values: list[str]) -> list[int]:
    layers = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                layers.append(int(part))
            except ValueError:
                raise TraitscopeError(f"--layers: {part!r} is not a layer index "
                                      "(e.g. --layers=-2 or --layers 6,11)") from None
    if not layers:
        raise TraitscopeError("--layers: give at least one layer index")
    return layers


def parse_tokens(value: str) -> list[str]:
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in TOKEN_KINDS]
    if unknown or not kinds:
        raise TraitscopeError(f"--tokens: {', '.join(unknown) or value!r} is not a token kind; "
                              "use patches, cls or patches,cls")
    return kinds


def run(args: argparse.Namespace) -> int:
    from traitscope.backbones import default_model, load_backbone
    from traitscope.images import open_source
    from traitscope.shards.build import build_shards, coarse_grid_hint, use_geometry

    if args.verify is not None:
        return verify(args.verify)
    check_out_dpath(args.out)
    layers = parse_layers(args.layers)
    token_kinds = parse_tokens(args.tokens)
    device = dist.pick_device(args.device)
    for flag, value in (("--batch-size", args.batch_size), ("--workers", args.workers),
                        ("--images-per-shard", args.images_per_shard)):
        if value is not None and value < 1:
            raise TraitscopeError(f"{flag} must be at least 1, not {value}")
    batch_size = args.batch_size or (32 if device.type == "cpu" else 128)

    with dist.session(device) as world:
        model_name = args.model
        if model_name is None:  # one choice for every rank (it may depend on the network)
            choice = dist.broadcast(default_model() if world.is_main else None)
            model_name = choice.name
            dist.say(choice.reason)  # which model, and why
        with dist.main_first():  # rank 0 first: a generated or downloaded image set lands in a shared cache once
            source = open_source(args.images, labels=args.labels, masks=args.masks)
        backbone = load_backbone(model_name, device=str(device))  # hub downloads lock their cache files
        use_geometry(backbone, source, args.geometry, args.resolution)
        about = "" if args.model is None else f" ({backbone.description})"
        where = f"{device}" if not world.distributed else f"{world.size} processes ({device.type})"
        height, width = backbone.preprocess.input_hw
        dist.say(f"recording layers {','.join(map(str, layers))} of {backbone.name}{about} on {where} "
                 f"over {source.spec}, {backbone.preprocess.geometry} at {width}x{height} px")
        if "patches" in token_kinds and (hint := coarse_grid_hint(backbone, layers)):
            dist.say(hint)

        shards = build_shards(source, backbone, layers, args.out, token_kinds=token_kinds, dtype=args.dtype,
                              batch_size=batch_size, images_per_shard=args.images_per_shard, strict=args.strict,
                              n_workers=args.workers, decode=args.decode, decode_workers=args.decode_workers)
        dist.say(os.fspath(shards.dpath))
    return 0


def verify(dpath: str) -> int:
    """`--verify DIR`: one line saying the folder is whole, or a TraitscopeError naming what is not."""
    from traitscope.shards.store import Shards

    shards = Shards(dpath)
    n_listed = len(shards.listing())
    shards.verify(progress=True)
    n_files = sum(len(s["files"]) for s in shards.manifest["shards"])
    print(f"{shards.dpath}: all {n_files} files match their sha256 ({shards.n_images} of {n_listed} images kept, "
          f"{shards.n_shards} shards)")
    return 0
