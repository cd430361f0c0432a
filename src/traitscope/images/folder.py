"""A folder of image files, searched recursively, with optional labels and segmentation masks."""

import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image

from traitscope.backbones.base import Preprocess
from traitscope.errors import TraitscopeError
from traitscope.images import labels as labels_mod
from traitscope.images.masks import mask_suffix, one_hot, patch_majority, read_mask, read_names
from traitscope.images.source import (Decoded, ImageError, ImageSource, MinSize, decode_image, image_extensions,
                                     jpeg_file, load_image, oriented_size)


def list_images(root: Path, exclude: Path | None = None) -> list[str]:
    """Relative POSIX paths of files with a Pillow image extension under `root`, sorted.

    Hidden files and folders (names starting with '.') are skipped, and so is `exclude` (a masks folder
    inside the images folder); links to folders are not followed. Files are listed by name only: one
    that is not really an image (or a dangling link, a FIFO...) is reported later, when it fails to load.
    """
    extensions = image_extensions()
    exclude = exclude.resolve() if exclude is not None else None
    found = []
    for dpath, dnames, fnames in os.walk(root):
        dnames[:] = [d for d in dnames if not d.startswith(".") and (exclude is None or Path(dpath, d).resolve() != exclude)]
        rel_dpath = Path(dpath).relative_to(root)
        for fname in fnames:
            if not fname.startswith(".") and os.path.splitext(fname)[1].lower() in extensions:
                found.append((rel_dpath / fname).as_posix())
    return sorted(found)


class FolderSource(ImageSource):
    """Every image file under a folder, in sorted relative-path order.

    `labels`: 'folders' (the first path component is the class) or a CSV / CelebA attribute file.
    `masks`: a folder with one PNG per image at the same relative path (extension .png, or one suffix after
    every name: `a_L.png` for `a.jpg`) holding trait ids (or colours), and a labels.json / labels.txt /
    class_dict.csv naming them (`traitscope.images.masks`).

    Identity (for content hashing): the resolved root and each file's relative path and size in bytes
    (None for a path that is not a regular file: a dangling link, a FIFO...), plus the labels file's sha256 and the masks' paths, sizes and names. Modification times are left out
    so a copied folder keeps its identity; an edit that keeps a file's size exactly is not noticed.
    """

    def __init__(self, root: str | Path, labels: str | None = None, masks: str | Path | None = None):
        self.root = Path(os.path.abspath(Path(root).expanduser()))  # absolute, symlinks kept as given
        if not self.root.exists():
            raise TraitscopeError(f"images folder {self.root} does not exist")
        if not self.root.is_dir():
            raise TraitscopeError(f"{self.root} is not a folder of images")
        self.masks_dpath = Path(os.path.abspath(Path(masks).expanduser())) if masks is not None else None
        if self.masks_dpath is not None and not self.masks_dpath.is_dir():
            raise TraitscopeError(f"masks folder {self.masks_dpath} does not exist")
        self.spec = str(self.root)
        self._paths = list_images(self.root, exclude=self.masks_dpath)
        if not self._paths:
            exts = " ".join(sorted(e for e in image_extensions() if e in (".jpg", ".jpeg", ".png", ".webp", ".tif", ".bmp")))
            raise TraitscopeError(f"no images in {self.root} (looked recursively for {exts} and other Pillow formats)")
        self._sizes = [_size(self.root / p) for p in self._paths]
        unusable = {p for p, size in zip(self._paths, self._sizes) if size is None}  # skipped when loaded

        self._labels = None
        if labels == "folders":
            self._labels = labels_mod.from_folders(self._paths)
        elif labels is not None:
            self._labels = labels_mod.from_file(labels, self._paths)
        self.image_label_names = list(self._labels.names) if self._labels else []

        self._mask_names: dict[int, str] = {}
        self._mask_colours = False
        self._mask_suffix = ""
        if self.masks_dpath is not None:
            self._mask_names, self._mask_colours = read_names(self.masks_dpath)
            self._mask_suffix = mask_suffix(self.masks_dpath, self._paths)
            missing = [p for p in self._paths if p not in unusable and not self._mask_fpath(p).is_file()]
            if missing:
                raise TraitscopeError(
                    f"{len(missing)} of {len(self._paths)} images have no mask in {self.masks_dpath} "
                    f"(e.g. {missing[0]!r} needs {self._mask_fpath(missing[0]).relative_to(self.masks_dpath).as_posix()!r}"
                    + ("" if self._mask_suffix else f", or every mask the same suffix after its image's name, as "
                                                    f"{Path(missing[0]).stem + '_L.png'!r}") + ")"
                )
        self.patch_label_names = list(self._mask_names.values())
        self._mask_column = {i: j for j, i in enumerate(self._mask_names)}

    def _mask_fpath(self, path: str) -> Path:
        fpath = self.masks_dpath / path
        return fpath.with_name(fpath.stem + self._mask_suffix + ".png")

    def records(self) -> list[dict]:
        label = self._labels.label if self._labels else (lambda path: None)
        return [{"index": i, "path": p, "label": label(p)} for i, p in enumerate(self._paths)]

    def load(self, record: dict) -> Image.Image:
        return load_image(self.root / record["path"])

    def image_size(self, record: dict) -> tuple[int, int]:
        return oriented_size(self.root / record["path"])

    def jpeg(self, record: dict) -> tuple[bytes, tuple[int, int], int] | None:
        return jpeg_file(self.root / record["path"])

    def decode(self, record: dict, min_size: MinSize | None = None) -> Decoded:
        if min_size is None:
            return super().decode(record)
        return decode_image(self.root / record["path"], min_size)

    def image_labels(self, record: dict) -> np.ndarray | None:
        return None if self._labels is None else self._labels.rows[record["path"]].copy()

    def patch_labels(self, record: dict, preprocess: Preprocess, grid: tuple[int, int]) -> np.ndarray | None:
        if self.masks_dpath is None:
            return None
        mask_hw = read_mask(self._mask_fpath(record["path"]), self._mask_colours)
        size = oriented_size(self.root / record["path"])
        if (mask_hw.shape[1], mask_hw.shape[0]) != size:
            raise ImageError(f"mask is {mask_hw.shape[1]}x{mask_hw.shape[0]} but the image is {size[0]}x{size[1]}")
        ids = patch_majority(mask_hw, preprocess, grid)
        return one_hot(ids, self._mask_column, len(self.patch_label_names))

    def identity(self) -> dict:
        identity = {
            "kind": "folder",
            "root": str(self.root),
            "files": [[p, s] for p, s in zip(self._paths, self._sizes)],
            "labels": self._labels.identity if self._labels else None,
            "masks": None,
        }
        if self.masks_dpath is not None:
            sizes = [_size(self._mask_fpath(p)) for p in self._paths]
            identity["masks"] = {"names": {str(k): v for k, v in self._mask_names.items()}, "sizes": sizes}
            if self._mask_colours:
                identity["masks"]["colours"] = True
            if self._mask_suffix:
                identity["masks"]["suffix"] = self._mask_suffix
        return identity


def _size(fpath: Path) -> int | None:
    """Size in bytes of a regular file (links followed), None for anything else; never opens it."""
    try:
        st = os.stat(fpath)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None
