"""Image sources: what `traitscope shards` reads, with the labels that come with the images.

`open_source(spec)` turns a command-line string into an `ImageSource`:

    path/to/folder                 every image file under it (FolderSource), optionally with
                                   labels='folders' or a labels CSV, and masks=<folder of id PNGs>
    path/to/synthetic-set          a folder written by `generate_synthetic` (SyntheticSource)
    hf:<name or path>[:split]      a Hugging Face dataset split (HFDatasetSource)
    synthetic[:<n>[:<seed>]]       the synthetic trait set, generated into the cache on first use

Every source decodes images through `load_image` (upright RGB, or ImageError with a reason).
"""

from pathlib import Path

from traitscope.errors import TraitscopeError
from traitscope.images.folder import FolderSource, list_images
from traitscope.images.hf_dataset import HFDatasetSource
from traitscope.images.masks import crop_mask, patch_majority
from traitscope.images.source import (Decoded, ImageError, ImageSource, decode_image, image_extensions, load_image,
                                     median_aspect, to_rgb)
from traitscope.images.synthetic import (
    DEFAULT_N_IMAGES,
    SyntheticSource,
    default_cache_dpath,
    ensure_synthetic,
    generate_synthetic,
    is_synthetic,
    preview,
)

__all__ = [
    "Decoded", "FolderSource", "HFDatasetSource", "ImageError", "ImageSource", "SyntheticSource", "crop_mask",
    "decode_image", "default_cache_dpath", "ensure_synthetic", "generate_synthetic", "image_extensions", "is_synthetic",
    "list_images", "load_image", "median_aspect", "open_source", "parse_synthetic_spec", "patch_majority", "preview", "to_rgb",
]


def parse_synthetic_spec(spec: str) -> tuple[int, int]:
    """'synthetic' / 'synthetic:<n>' / 'synthetic:<n>:<seed>' -> (n_images, seed)."""
    parts = spec.split(":")
    if parts[0] != "synthetic" or len(parts) > 3 or not all(p.isdigit() for p in parts[1:]):
        raise TraitscopeError(f"{spec!r}: the synthetic set is named synthetic, synthetic:<n> or synthetic:<n>:<seed>")
    n_images = int(parts[1]) if len(parts) > 1 else DEFAULT_N_IMAGES
    seed = int(parts[2]) if len(parts) > 2 else 0
    if n_images < 1:
        raise TraitscopeError(f"{spec!r}: the synthetic set needs at least one image")
    return n_images, seed


def open_source(
    images: str,
    labels: str | None = None,
    masks: str | None = None,
    cache_dpath: str | Path | None = None,
) -> ImageSource:
    """The image source a command-line string names (see the module docstring).

    `labels` ('folders' or a CSV / CelebA attribute file) and `masks` apply to folders only; the
    synthetic set and datasets bring their own labels. `cache_dpath` is where `synthetic[...]` is
    generated (default: `default_cache_dpath()`).
    """
    images = str(images)
    is_generated = images == "synthetic" or images.startswith("synthetic:")
    if images.startswith("hf:") or is_generated or is_synthetic(images):
        if labels is not None or masks is not None:
            kind = "Hugging Face datasets" if images.startswith("hf:") else "the synthetic set"
            raise TraitscopeError(f"--labels and --masks apply to image folders; {kind} bring their own labels")
        if images.startswith("hf:"):
            return HFDatasetSource(images)
        if is_generated:
            n_images, seed = parse_synthetic_spec(images)
            return SyntheticSource(ensure_synthetic(n_images, seed, cache_dpath))
        return SyntheticSource(images)
    return FolderSource(images, labels=labels, masks=masks)
