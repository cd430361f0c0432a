"""saev activation shards, read in place: `metadata.json` + `acts000000.bin`, … (+ `labels.bin`).

Each `acts{i:06d}.bin` is raw float32, C order, (examples_per_shard, n_layers, tokens, d_model), with
tokens = [CLS] (when `cls_token`) then the content (patch) tokens in the model's order;
examples_per_shard = tokens budget // (tokens × n_layers); the last file holds the remaining
examples (`shards.json` gives each file's count when present). `labels.bin` is uint8
(n_examples, patches): one class index per patch. Three spellings of metadata.json are read:

| saev | keys |
| --- | --- |
| 0.1 (PyPI) | vit_family, vit_ckpt, layers, n_patches_per_img, cls_token, d_vit, n_imgs, n_patches_per_shard |
| protocol 1.x / 2.1 | family, ckpt, layers, patches_per_ex, cls_token, d_model, n_examples, patches_per_shard, dataset |
| 2025 on (protocol 2.1) | … content_tokens_per_example, max_tokens_per_shard, pixel_agg |

`SaevShards` offers the same interface as `traitscope.shards.Shards` (which opens such a folder as
one), so train, inference, align and the app read it without a copy. What saev does not record is
said, not guessed: the model's weights hash and preprocessing, the number of model layers (so layers
are named as saev stored them), and the image files (their order is in a pickled dataset config,
which traitscope never unpickles): images are listed from the metadata's `dataset` folder only when
it is a class-per-folder tree (torchvision ImageFolder order, what saev's image-folder data set uses)
holding exactly `n_examples` images, or from the tree `--images-root` names (`use_images_root`); else
`images_unknown` says so. `labels.bin` classes become patch labels `class_<i>`.
"""

import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from traitscope.errors import TraitscopeError
from traitscope.shards.store import Shards, TokenArray, register_layout

FORMAT = "saev-shards"
PROTOCOLS = ("1.0.0", "1.1", "2.1")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_saev_shards(dpath: Path) -> bool:
    """A saev shard folder: metadata.json and acts000000.bin, no traitscope manifest."""
    return ((dpath / "metadata.json").is_file() and (dpath / "acts000000.bin").is_file()
            and not (dpath / "manifest.json").is_file())


class TokenRows:
    """(items × tokens, width) rows of an (items, tokens, width) array view, read item by item: a
    strided memory map (one layer, some tokens) looks like a flat token array without a copy."""

    ndim = 2

    def __init__(self, arr_itw: np.ndarray):
        self.arr = arr_itw
        n, self.t, w = arr_itw.shape
        self.shape = (n * self.t, w)
        self.dtype = arr_itw.dtype
        self.size = n * self.t * w

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        t, w = self.t, self.arr.shape[-1]
        if isinstance(idx, slice):
            start, stop, step = idx.indices(self.shape[0])
            if start >= stop:
                return np.empty((0, w), self.dtype)
            a, b = start // t, (stop - 1) // t + 1
            rows = np.asarray(self.arr[a:b]).reshape(-1, w)[start - a * t:stop - a * t]
            return rows[::step] if step != 1 else rows
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + (self.shape[0] if idx < 0 else 0)
            return np.asarray(self.arr[i // t, i % t])
        idx = np.asarray(idx)
        return np.asarray(self.arr[idx // t, idx % t])


class OneHotRows(TokenRows):
    """(items × patches, n_classes) uint8 one-hot rows of (items, patches) class indices."""

    def __init__(self, labels_ip: np.ndarray, n_classes: int):
        super().__init__(labels_ip[:, :, None])
        self.shape = (self.shape[0], n_classes)
        self.size = self.shape[0] * n_classes
        self.dtype = np.dtype(np.uint8)
        self.n_classes = n_classes

    def __getitem__(self, idx):
        classes = super().__getitem__(idx)[..., 0]
        return (classes[..., None] == np.arange(self.n_classes, dtype=classes.dtype)).astype(np.uint8)


def _get(meta: dict, *keys):
    for key in keys:
        if key in meta:
            return meta[key]
    raise TraitscopeError(f"saev metadata.json lacks {' / '.join(keys)}")


def _dataset_root(meta: dict) -> str:
    """The image folder saev read: `dataset` (protocol 2.1), or the root in saev 0.1's `data` repr."""
    if meta.get("dataset"):
        return str(meta["dataset"])
    found = re.search(r"ImageFolderDataset\(root='([^']*)'", str(meta.get("data", "")))
    return found.group(1) if found else ""


def _preprocess(meta: dict) -> dict | None:
    """saev's image transform where its sources fix it for the family and version, else None (unknown).

    DINOv2: saev 0.1 resizes the shorter side to 256 and centre-crops 224; saev since 2025 (metadata
    with content_tokens_per_example) resizes to 256 x 256 and centre-crops 224. Both bilinear, ImageNet
    normalisation. CLIP, SigLIP and the others use their checkpoint's own transform: not recorded."""
    from traitscope.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    if meta.get("family", meta.get("vit_family")) != "dinov2":
        return None
    mode = "squash-crop" if "content_tokens_per_example" in meta else "shorter" if "vit_family" in meta else None
    if mode is None:
        return None
    return Preprocess(crop=224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear",
                      mode=mode).to_dict()


def image_folder_paths(root: Path) -> list[str]:
    """Image files under `root` in torchvision ImageFolder's order (sorted class folders, then sorted
    os.walk), relative to `root`: the order of saev's image-folder data set."""
    paths = []
    for cls in sorted(e.name for e in os.scandir(root) if e.is_dir()):
        for dirpath, _, fnames in sorted(os.walk(root / cls, followlinks=True)):
            paths += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(fnames)
                      if f.lower().endswith(IMAGE_EXTENSIONS)]
    return paths


class SaevShards(Shards):
    """A saev shard folder behind the `Shards` interface (memory-mapped in place, nothing copied)."""

    def __init__(self, dpath: str | Path):
        self.dpath = Path(dpath)
        meta_fpath = self.dpath / "metadata.json"
        try:
            meta = json.loads(meta_fpath.read_bytes())
        except (ValueError, UnicodeDecodeError) as err:
            raise TraitscopeError(f"{meta_fpath}: not valid JSON (truncated?): {err}") from None
        where = str(meta_fpath)
        protocol = meta.get("protocol")
        if protocol is not None and str(protocol) not in PROTOCOLS:
            raise TraitscopeError(f"{where}: saev shard protocol {protocol!r} is not one traitscope reads "
                                  f"({', '.join(PROTOCOLS)} or none)")
        if meta.get("dtype", "float32") != "float32":
            raise TraitscopeError(f"{where}: dtype {meta['dtype']!r}; saev shards are float32")
        self.saev_meta = meta
        self.saev_layers = [int(v) for v in _get(meta, "layers")]
        self.n_content = int(_get(meta, "content_tokens_per_example", "patches_per_ex", "n_patches_per_img"))
        self.has_cls = bool(_get(meta, "cls_token"))
        width = int(_get(meta, "d_model", "d_vit"))
        n_examples = int(_get(meta, "n_examples", "n_imgs"))
        budget = int(_get(meta, "max_tokens_per_shard", "patches_per_shard", "n_patches_per_shard"))
        self.n_tokens = self.n_content + int(self.has_cls)
        per_shard = budget // (self.n_tokens * len(self.saev_layers))
        if per_shard < 1:
            raise TraitscopeError(f"{where}: a shard of {budget} tokens holds no example")
        counts = [min(per_shard, n_examples - s * per_shard) for s in range(math.ceil(n_examples / per_shard))]
        if (self.dpath / "shards.json").is_file():
            listed = json.loads((self.dpath / "shards.json").read_text())
            counts = [int(s["n_examples"]) for s in listed]
            if sum(counts) != n_examples:
                raise TraitscopeError(f"{self.dpath}/shards.json counts {sum(counts)} examples, metadata.json {n_examples}")
        self.per_shard, self.counts = per_shard, counts
        self._maps = [self._map(s, n) for s, n in enumerate(counts)]
        side = math.isqrt(self.n_content)
        grid = [side, side] if side * side == self.n_content else [1, self.n_content]
        model = {"name": meta.get("ckpt", meta.get("vit_ckpt")), "family": meta.get("family", meta.get("vit_family")),
                 "d_model": width, "n_layers": None, "patch_size": None, "weights_sha256": None}
        layers = [str(v) for v in self.saev_layers]
        self.manifest = {
            "format": FORMAT, "hash": "saev-" + hashlib.sha256(meta_fpath.read_bytes()).hexdigest()[:16],
            "model": model, "layers": self.saev_layers,
            "token_kinds": ["patches", "cls"] if self.has_cls else ["patches"],
            "d_model": {v: width for v in layers}, "grid": {v: grid for v in layers},
            "layout": {"n_cls": int(self.has_cls), "n_registers": 0}, "preprocess": _preprocess(meta),
            "dtype": "float32", "images_root": _dataset_root(meta), "n_images": n_examples,
            "n_listed": n_examples, "n_skipped": 0, "source": {"spec": f"saev:{self.dpath}", "kind": "saev"},
            "shards": [{"index": s, "n_images": n} for s, n in enumerate(counts)],
            "patch_labels": [], "image_labels": [], "protocol": protocol,
        }
        self.manifest["patch_labels"] = self._label_names()
        self._images = None

    def _map(self, s: int, n: int) -> np.ndarray:
        fpath = self.dpath / f"acts{s:06d}.bin"
        row_bytes = len(self.saev_layers) * self.n_tokens * int(self.saev_meta.get("d_model", self.saev_meta.get("d_vit"))) * 4
        size = fpath.stat().st_size if fpath.is_file() else 0
        if size < n * row_bytes:
            raise TraitscopeError(f"{fpath}: {size:,} bytes, but its {n} examples need {n * row_bytes:,} "
                                  "(missing or truncated)")
        shape = (size // row_bytes, len(self.saev_layers), self.n_tokens, row_bytes // 4 // len(self.saev_layers) // self.n_tokens)
        return np.memmap(fpath, dtype=np.float32, mode="r", shape=shape)[:n]

    # --- identity ---
    def resolve(self, layer: int) -> int:
        """saev names layers as it stored them (it does not record the model's depth)."""
        if layer not in self.saev_layers:
            raise TraitscopeError(f"layer {layer} is not in {self.dpath} (saev stored layers: {self.saev_layers})")
        return layer

    # --- images ---
    def listing(self) -> list[dict]:
        paths = self._image_paths()
        return [{"index": i, "path": paths[i] if paths else None, "width": None, "height": None,
                 "label": Path(paths[i]).parts[0] if paths and len(Path(paths[i]).parts) > 1 else None,
                 "row": i, "skipped": None} for i in range(self.n_images)]

    def _image_paths(self) -> list[str] | None:
        """The image files of the images root, when it is a class-per-folder tree of n_examples images."""
        root = Path(self.manifest["images_root"]) if self.manifest["images_root"] else None
        if root is None or not root.is_dir():
            return None
        paths = image_folder_paths(root)
        return paths if len(paths) == self.n_images else None

    def use_images_root(self, images_root: str | Path) -> None:
        """Read the images from `images_root` (`--images-root`): the class-per-folder tree saev read, for
        shards whose metadata does not name it or names a folder that has moved. Refused (TraitscopeError)
        unless it holds exactly n_examples images in class folders."""
        root = Path(images_root)
        if not root.is_dir():
            raise TraitscopeError(f"--images-root {root}: not a folder")
        n_found = len(image_folder_paths(root))
        if n_found != self.n_images:
            raise TraitscopeError(f"--images-root {root}: {n_found} images in class folders, but the saev shards "
                                  f"{self.dpath} hold {self.n_images} examples; give the class-per-folder image "
                                  "tree saev read (torchvision ImageFolder order: sorted class folders, sorted files)")
        self.manifest["images_root"] = str(root.resolve())
        self._images = None

    def images_unknown(self) -> str | None:
        """Why the image files are unknown (what the app and a heatmap need), or None when they are listed."""
        if self._image_paths() is not None:
            return None
        recorded = self.manifest["images_root"]
        where = (f"the metadata's dataset folder {recorded} is not a class-per-folder tree of {self.n_images} images"
                 if recorded else "the metadata names no image folder")
        return (f"{self.dpath}: the image files are unknown (saev shards do not record them, and {where}); "
                f"the app's top-image tiles and heatmaps need `traitscope app --images-root DIR`, the class-per-folder "
                f"image tree saev read "
                f"({self.n_images} images)")

    def image_fpath(self, row: int) -> Path:
        path = self.images[row]["path"]
        if path is None:
            raise TraitscopeError(self.images_unknown())
        return Path(self.manifest["images_root"]) / path

    # --- arrays ---
    def acts(self, layer: int, kind: str = "patches") -> TokenArray:
        if kind not in self.token_kinds:
            raise TraitscopeError(f"{self.dpath} has no {kind!r} tokens (stored: {self.token_kinds})")
        li = self.saev_layers.index(self.resolve(layer))
        tokens = slice(int(self.has_cls), self.n_tokens) if kind == "patches" else slice(0, 1)
        maps = [TokenRows(m[:, li, tokens, :]) for m in self._maps]
        fpaths = [self.dpath / f"acts{s:06d}.bin" for s in range(len(self._maps))]
        return TokenArray(fpaths, self.n_content if kind == "patches" else 1, maps=maps)

    def _labels(self) -> np.ndarray | None:
        fpath = self.dpath / "labels.bin"
        if not fpath.is_file():
            return None
        need = self.n_images * self.n_content
        if fpath.stat().st_size != need:
            raise TraitscopeError(f"{fpath}: {fpath.stat().st_size:,} bytes, expected {need:,} "
                                  f"(n_examples × patches, uint8)")
        return np.memmap(fpath, dtype=np.uint8, mode="r", shape=(self.n_images, self.n_content))

    def _label_names(self) -> list[str]:
        labels = self._labels()
        if labels is None:
            return []
        n = max(int(labels[s:s + 65536].max(initial=0)) for s in range(0, len(labels), 65536)) + 1
        return [f"class_{i}" for i in range(n)]

    def patch_labels(self) -> TokenArray | None:
        labels = self._labels()
        if labels is None:
            return None
        n = len(self.patch_label_names)
        maps = [OneHotRows(labels[s * self.per_shard:s * self.per_shard + c], n) for s, c in enumerate(self.counts)]
        return TokenArray([self.dpath / "labels.bin"] * len(maps), self.n_content, maps=maps)

    def image_labels(self) -> np.ndarray | None:
        return None

    def verify(self) -> None:
        """saev records no checksums; the sizes were checked on opening."""


register_layout(is_saev_shards, SaevShards)
