"""The shard folder on disk: memory-mapped activation arrays, an image index, and a manifest.

Layout of one content-addressed folder (see docs/formats.md):

    manifest.json                  written last: its presence means the folder is complete
    images.jsonl                   one line per listed image (kept or skipped), in listing order
    L{layer}/patches-{s:05d}.npy   (n_images, n_patches, d_model) activations of patch tokens
    L{layer}/cls-{s:05d}.npy       (n_images, d_model) CLS token or pooled embedding
    labels/patches-{s:05d}.npy     (n_images, n_patches, n_patch_labels) uint8 per-patch labels
    labels/images-{s:05d}.npy      (n_images, n_image_labels) uint8 per-image labels
    progress/{s:05d}.json          a finished shard's record, for resuming an interrupted run

Row r of a `patches` array (flattened over shards) is image r // n_patches, patch r % n_patches;
row r of a `cls` array is image r. Images are the kept ones, in listing order.
"""

import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from traitscope.backbones.base import Preprocess
from traitscope.errors import TraitscopeError
from traitscope.files import (atomic_save_npy, atomic_write_bytes, atomic_write_json, file_sha256, read_json,
                              tmp_name, unlink_quietly)

FORMAT = "traitscope-shards/1"
TOKEN_KINDS = ("patches", "cls")
REPAIR = ("rerun `traitscope shards` with the same arguments: it checks the folder and recomputes only what "
          "is damaged")
"""What to do about a damaged shard folder (the end of every error line that names a damaged file)."""
_REQUIRED = ("hash", "model", "layers", "token_kinds", "d_model", "grid", "n_images", "shards", "dtype")


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The .npy header `np.save` writes for a C-order array of this dtype and shape."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


class NpyAppender:
    """Streams rows into a .npy file without holding the array: the file is written under a temporary
    name, its header (with the final row count) is filled in by `close`, and only then renamed.

    The result has the same bytes as `np.save` of the whole array. numpy pads the header so the first
    axis can grow to 21 digits, so the header reserved up front keeps its length.
    """

    def __init__(self, fpath: Path, dtype: str | np.dtype, row_shape: tuple[int, ...]):
        self.fpath = Path(fpath)
        self.tmp_fpath = tmp_name(self.fpath)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(int(n) for n in row_shape)
        self.n_rows = 0
        self._header_len = len(_npy_header(self.dtype, (0, *self.row_shape)))
        self.fpath.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.tmp_fpath, "wb")
        try:
            self._f.write(b"\0" * self._header_len)
        except BaseException:
            self.abort()
            raise

    def append(self, rows: np.ndarray) -> None:
        """Append rows of shape (n, *row_shape); they are converted to the file's dtype."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.fpath.name}: rows of shape {rows.shape[1:]}, expected {self.row_shape}")
        self._f.write(memoryview(rows.reshape(-1)).cast("B"))
        self.n_rows += rows.shape[0]

    def close(self) -> None:
        """Write the header, fsync and rename to the final name."""
        header = _npy_header(self.dtype, (self.n_rows, *self.row_shape))
        if len(header) != self._header_len:  # never with numpy's growth padding; kept for safety
            raise RuntimeError(f"{self.fpath.name}: .npy header changed length ({self._header_len} -> {len(header)})")
        try:
            self._f.seek(0)
            self._f.write(header)
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.tmp_fpath, self.fpath)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the half-written file."""
        try:
            self._f.close()
        except OSError:
            pass
        unlink_quietly(self.tmp_fpath)


def open_npy(fpath: Path, shape: tuple[int, ...], dtype: np.dtype, fix: str = REPAIR) -> np.ndarray:
    """A .npy file memory-mapped read-only, checked to hold exactly `shape` of `dtype` and nothing
    more; a missing, truncated or damaged file is a TraitscopeError that names it and says `fix`."""
    try:
        arr = np.load(fpath, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise TraitscopeError(f"{fpath} is missing; {fix}") from None
    except (ValueError, OSError, EOFError, SyntaxError) as err:  # numpy's errors for a damaged header or length
        raise TraitscopeError(f"{fpath} is damaged ({' '.join(str(err).split())}); {fix}") from None
    if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise TraitscopeError(f"{fpath} is damaged (holds {arr.dtype} {arr.shape}, the manifest says "
                              f"{np.dtype(dtype)} {tuple(shape)}); {fix}")
    size = os.path.getsize(fpath)
    if size != arr.offset + arr.nbytes:
        raise TraitscopeError(f"{fpath} is damaged ({size} bytes, expected {arr.offset + arr.nbytes}); {fix}")
    return arr


def shard_fname(kind: str, shard: int) -> str:
    return f"{kind}-{shard:05d}.npy"


class TokenArray:
    """Read-only concatenation of memory-mapped shard files, viewed as (n_rows, width).

    Patch arrays are flattened to one row per patch token. Reads copy only the rows asked for.
    """

    def __init__(self, fpaths: list[Path], rows_per_item: int, maps: list | None = None,
                 shapes: list[tuple[int, ...]] | None = None, dtype: str | np.dtype | None = None):
        """`maps`: the per-file (rows, width) arrays when they are not .npy files (saev shards).
        `shapes` and `dtype`: what each file must hold (see `open_npy`); unchecked when not given."""
        self.fpaths = fpaths
        self.rows_per_item = rows_per_item
        self._maps: list[np.ndarray] = [] if maps is None else list(maps)
        for i, fpath in enumerate(fpaths if maps is None else []):
            arr = (open_npy(fpath, shapes[i], dtype) if shapes is not None else
                   np.load(fpath, mmap_mode="r", allow_pickle=False))
            self._maps.append(arr.reshape(arr.shape[0] * rows_per_item, arr.shape[-1]) if arr.size else
                              arr.reshape(0, arr.shape[-1]))
        self.width = self._maps[0].shape[1] if self._maps else 0
        self.dtype = self._maps[0].dtype if self._maps else np.dtype("float16")
        self.offsets = np.cumsum([0] + [m.shape[0] for m in self._maps])
        self.n_rows = int(self.offsets[-1])

    def __len__(self) -> int:
        return self.n_rows

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.width)

    @property
    def maps(self) -> list[np.ndarray]:
        """The per-file memory maps, each (rows_in_file, width): for large sequential reads."""
        return self._maps

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) as an array (a copy), crossing file boundaries as needed."""
        start, stop = max(0, start), min(stop, self.n_rows)
        if out is None:
            out = np.empty((max(0, stop - start), self.width), dtype=self.dtype)
        pos = 0
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            local = start - self.offsets[i]
            take = min(stop - start, self.offsets[i + 1] - start)
            out[pos:pos + take] = self._maps[i][local:local + take]
            pos += take
            start += take
            i += 1
        return out

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(self.n_rows)
            rows = self.read(start, stop)
            return rows[::step] if step != 1 else rows
        if isinstance(idx, (int, np.integer)):
            return self.read(int(idx), int(idx) + 1)[0]
        idx = np.asarray(idx)
        out = np.empty((len(idx), self.width), dtype=self.dtype)
        file_of = np.searchsorted(self.offsets, idx, side="right") - 1
        for i in np.unique(file_of):
            sel = file_of == i
            out[sel] = self._maps[i][idx[sel] - self.offsets[i]]
        return out


class PatchValidity(NamedTuple):
    """Which patch tokens hold image pixels. Letterbox and grid pad an image to the model's input; the
    patches of pure padding are never trained on, counted, ranked, aligned or drawn."""

    boxes: np.ndarray
    """(n_images, 4) int64 per image: row0, col0, row1, col1; its patches in rows [row0, row1) and cols
    [col0, col1) of the grid hold image pixels."""
    grid: tuple[int, int]
    """Patch rows and columns of the layer."""

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def of_rows(self, token_rows: np.ndarray) -> np.ndarray:
        """bool per flattened patch row (image * n_patches + patch): True where it holds image pixels."""
        image, patch = np.divmod(np.asarray(token_rows, dtype=np.int64), self.n_patches)
        row, col = np.divmod(patch, self.grid[1])
        box = self.boxes[image]
        return (row >= box[..., 0]) & (col >= box[..., 1]) & (row < box[..., 2]) & (col < box[..., 3])

    def of_images(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, n_patches) bool for images [start, stop)."""
        rows = np.arange(start * self.n_patches, stop * self.n_patches)
        return self.of_rows(rows).reshape(stop - start, self.n_patches)


def patch_validity(preprocess: dict | None, sizes: list[tuple[int, int] | None], grid: tuple[int, int]) -> PatchValidity | None:
    """The validity of images of these (width, height) under a manifest's `preprocess`, or None when every
    patch of every image holds image pixels (centre crop, squash, shards made before geometries).

    An image whose size is not known (None: saev shards read in place record none) counts as all image
    pixels: nothing says where padding would be, so no patch of it is left out."""
    if not preprocess:
        return None
    pre = Preprocess.from_dict(preprocess)
    if not pre.pads or all(size is None for size in sizes):
        return None
    full = (0, 0, int(grid[0]), int(grid[1]))
    boxes = np.array([full if size is None else pre.valid_box(*size, grid) for size in sizes],
                     dtype=np.int64).reshape(-1, 4)
    return PatchValidity(boxes, (int(grid[0]), int(grid[1])))


def _image_size(rec: dict) -> tuple[int, int] | None:
    """An image record's (width, height), or None when it records none (or not a usable one)."""
    try:
        width, height = int(rec["width"]), int(rec["height"])
    except (KeyError, TypeError, ValueError):
        return None
    return (width, height) if width > 0 and height > 0 else None


_LAYOUTS: list[tuple[Callable[[Path], bool], type["Shards"]]] = []
"""Other tools' shard layouts that `Shards(dpath)` opens: (recognises the folder, the class that reads it)."""


def register_layout(recognises: Callable[[Path], bool], reader: type["Shards"]) -> None:
    """Open a folder that `recognises(dpath)` as `reader`, a `Shards` subclass that reads it in place
    (`traitscope.shards.saev` registers saev's layout)."""
    _LAYOUTS.append((recognises, reader))


class Shards:
    """A complete shard folder, opened for reading (memory-mapped; nothing is loaded up front).

    A saev shard folder (metadata.json + acts*.bin) opens as `traitscope.shards.saev.SaevShards`,
    which reads it in place behind this interface."""

    def __new__(cls, dpath: str | Path):
        if cls is Shards:
            for recognises, reader in _LAYOUTS:
                if recognises(Path(dpath)):
                    return super().__new__(reader)
        return super().__new__(cls)

    def __init__(self, dpath: str | Path):
        self.dpath = Path(dpath)
        manifest_fpath = self.dpath / "manifest.json"
        if not manifest_fpath.is_file():
            hint = " (an interrupted run? rerun `traitscope shards` to finish it)" if (self.dpath / "progress").is_dir() else ""
            raise TraitscopeError(f"{self.dpath} is not a complete shard folder: no manifest.json{hint}")
        self.manifest = read_json(manifest_fpath, REPAIR)
        if self.manifest.get("format") != FORMAT:
            raise TraitscopeError(f"{manifest_fpath}: unknown format {self.manifest.get('format')!r}, expected {FORMAT}")
        missing = [key for key in _REQUIRED if key not in self.manifest]
        if missing or not all(isinstance(s, dict) and "files" in s and "n_images" in s for s in self.manifest["shards"]):
            raise TraitscopeError(f"{manifest_fpath} is damaged (no {', '.join(missing) or 'shard records'}); {REPAIR}")
        self._images: list[dict] | None = None

    # --- identity ---
    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def token_kinds(self) -> list[str]:
        return list(self.manifest["token_kinds"])

    @property
    def n_images(self) -> int:
        """Kept images (rows of a cls array)."""
        return int(self.manifest["n_images"])

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    def d_model(self, layer: int) -> int:
        return int(self.manifest["d_model"][str(self.resolve(layer))])

    def grid(self, layer: int) -> tuple[int, int]:
        rows, cols = self.manifest["grid"][str(self.resolve(layer))]
        return int(rows), int(cols)

    def n_patches(self, layer: int) -> int:
        rows, cols = self.grid(layer)
        return rows * cols

    def resolve(self, layer: int) -> int:
        """A stored layer given as stored index or as a negative index of the model."""
        n_layers = int(self.model["n_layers"])
        resolved = layer % n_layers if -n_layers <= layer < n_layers else layer
        if resolved not in self.layers:
            raise TraitscopeError(f"layer {layer} is not in {self.dpath} (stored layers: {self.layers})")
        return resolved

    # --- images ---
    @property
    def images(self) -> list[dict]:
        """Kept images in row order: dicts with index, path, width, height, label, row."""
        if self._images is None:
            self._images = [rec for rec in self.listing() if rec.get("row") is not None]
        return self._images

    def listing(self) -> list[dict]:
        """Every listed image, kept or skipped (with its 'skipped' reason)."""
        fpath = self.dpath / "images.jsonl"
        try:
            with open(fpath) as f:
                listing = [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            raise TraitscopeError(f"{fpath} is missing; {REPAIR}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TraitscopeError(f"{fpath} is damaged ({err}); {REPAIR}") from None
        if not all(isinstance(rec, dict) and "path" in rec for rec in listing):
            raise TraitscopeError(f"{fpath} is damaged (a line is not an image record); {REPAIR}")
        return listing

    def image_fpath(self, row: int) -> Path:
        """Absolute path of the image behind a cls row."""
        return Path(self.manifest["images_root"]) / self.images[row]["path"]

    def use_images_root(self, images_root: str | Path) -> None:
        """Read the images from `images_root` (`--images-root`: the photos moved since the shards were
        made); TraitscopeError when the first kept image is not there."""
        root = Path(images_root)
        first = self.images[0]["path"] if self.images else None
        if not root.is_dir() or (first is not None and not (root / first).is_file()):
            raise TraitscopeError(f"--images-root {root}: no {first} there (the first image of {self.dpath})")
        self.manifest["images_root"] = str(root.resolve())

    def images_unknown(self) -> str | None:
        """Why the image files are unknown, or None: a traitscope shard folder always lists them."""
        return None

    # --- arrays ---
    def acts(self, layer: int, kind: str = "patches") -> TokenArray:
        """Activations of one layer and token kind, as a (n_rows, d_model) memory-mapped array."""
        if kind not in self.token_kinds:
            raise TraitscopeError(f"{self.dpath} has no {kind!r} tokens (stored: {self.token_kinds})")
        layer = self.resolve(layer)
        fpaths = [self.dpath / f"L{layer}" / shard_fname(kind, s["index"]) for s in self.manifest["shards"]]
        row = (self.n_patches(layer), self.d_model(layer)) if kind == "patches" else (self.d_model(layer),)
        return TokenArray(fpaths, self.n_patches(layer) if kind == "patches" else 1, shapes=self._shapes(row),
                          dtype=self.manifest["dtype"])

    def _shapes(self, row_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Each shard file's shape, for files whose rows have `row_shape`."""
        return [(int(s["n_images"]), *row_shape) for s in self.manifest["shards"]]

    def patch_validity(self, layer: int) -> PatchValidity | None:
        """Which patch tokens of each image hold image pixels (see `PatchValidity`); None when all do."""
        layer = self.resolve(layer)
        cache = self.__dict__.setdefault("_validity", {})
        if layer not in cache:
            preprocess = self.manifest.get("preprocess")
            sizes = [_image_size(rec) for rec in self.images] if preprocess else []
            cache[layer] = patch_validity(preprocess, sizes, self.grid(layer))
        return cache[layer]

    @property
    def patch_label_names(self) -> list[str]:
        return list(self.manifest.get("patch_labels", []))

    @property
    def image_label_names(self) -> list[str]:
        return list(self.manifest.get("image_labels", []))

    def patch_labels(self) -> TokenArray | None:
        """(n_images * n_patches, n_patch_labels) uint8, aligned with `acts(layer, 'patches')` rows."""
        if not self.patch_label_names:
            return None
        fpaths = [self.dpath / "labels" / shard_fname("patches", s["index"]) for s in self.manifest["shards"]]
        n_patches = self.n_patches(self.layers[0])
        return TokenArray(fpaths, n_patches, shapes=self._shapes((n_patches, len(self.patch_label_names))),
                          dtype=np.uint8)

    def image_labels(self) -> np.ndarray | None:
        """(n_images, n_image_labels) uint8, aligned with cls rows."""
        if not self.image_label_names:
            return None
        fpaths = [self.dpath / "labels" / shard_fname("images", s["index"]) for s in self.manifest["shards"]]
        return TokenArray(fpaths, 1, shapes=self._shapes((len(self.image_label_names),)), dtype=np.uint8)[:]

    def damaged(self, progress: bool = False) -> list[tuple[int, str]]:
        """(shard index, why) for every shard with a file that is missing or does not match its sha256
        in the manifest. Reads every byte; `progress` shows a bar (to stderr) while it does."""
        from tqdm import tqdm

        files = [(s["index"], rel, digest) for s in self.manifest["shards"] for rel, digest in s["files"].items()]
        damaged: dict[int, str] = {}
        for shard, rel, digest in tqdm(files, desc="checking", unit="file", disable=not progress, file=sys.stderr,
                                       dynamic_ncols=True):
            fpath = self.dpath / rel
            if shard in damaged:
                continue
            if not fpath.is_file():
                damaged[shard] = f"{fpath} is missing"
            elif file_sha256(fpath) != digest:
                damaged[shard] = f"{fpath} does not match its sha256 in the manifest"
        return sorted(damaged.items())

    def verify(self, progress: bool = False) -> None:
        """Check every shard file against the manifest's checksums; TraitscopeError naming the first
        damaged file (and how many shards are damaged)."""
        damaged = self.damaged(progress)
        if damaged:
            more = f" (and {len(damaged) - 1} more damaged shard(s))" if len(damaged) > 1 else ""
            raise TraitscopeError(f"{damaged[0][1]}{more}; {REPAIR}")


def content_hash(identity: dict) -> str:
    """Short stable hash of a JSON-able description: names a content-addressed folder."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class ShardWriter:
    """Writes one shard folder shard by shard; a rerun skips shards an earlier run finished.

    `header` holds the manifest's fixed fields: model, layers, token_kinds, d_model, grid, layout,
    preprocess, dtype, images_root, patch_labels, image_labels, and hash.
    """

    def __init__(self, dpath: str | Path, header: dict):
        self.dpath = Path(dpath)
        self.header = header
        (self.dpath / "progress").mkdir(parents=True, exist_ok=True)

    def progress_fpath(self, shard: int) -> Path:
        return self.dpath / "progress" / f"{shard:05d}.json"

    def shard_done(self, shard: int) -> bool:
        """True when an earlier run finished this shard and its files are all there at full size."""
        fpath = self.progress_fpath(shard)
        if not fpath.is_file():
            return False
        try:
            record = read_json(fpath)
        except TraitscopeError:  # a damaged record: the shard is recomputed
            return False
        return isinstance(record.get("sizes"), dict) and all((self.dpath / rel).is_file() and (self.dpath / rel).stat().st_size == size
                   for rel, size in record["sizes"].items())

    def shard_record(self, shard: int) -> dict | None:
        """The progress record of a finished shard (with any `extra` fields), or None."""
        return read_json(self.progress_fpath(shard)) if self.shard_done(shard) else None

    def remove_stale_tmp(self) -> list[Path]:
        """Delete half-written `*.tmp` files an interrupted run left behind; returns what it removed."""
        stale = sorted(self.dpath.rglob("*.tmp"))
        for fpath in stale:
            unlink_quietly(fpath)
        return stale

    def write_shard(self, shard: int, first_listed: int, n_listed: int, arrays: dict[str, np.ndarray],
                    extra: dict | None = None) -> None:
        """Save a shard's arrays (relative path -> array, all with the same number of images)."""
        n_images = {len(a) for a in arrays.values()}
        assert len(n_images) == 1, f"shard {shard}: arrays disagree on the number of images: {n_images}"
        for rel, array in arrays.items():
            fpath = self.dpath / rel
            fpath.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_npy(fpath, array)
        self.commit_shard(shard, first_listed, n_listed, n_images.pop(), list(arrays), extra)

    def commit_shard(self, shard: int, first_listed: int, n_listed: int, n_images: int, rels: list[str],
                     extra: dict | None = None) -> None:
        """Record a shard whose files (relative paths `rels`) are all in place: checksums, sizes, and
        `extra` JSON fields kept in the progress record. Until this returns the shard is not done."""
        files, sizes = {}, {}
        for rel in rels:
            fpath = self.dpath / rel
            files[rel] = file_sha256(fpath)
            sizes[rel] = fpath.stat().st_size
        record = {"index": shard, "first_listed": first_listed, "n_listed": n_listed,
                  "n_images": n_images, "files": files, "sizes": sizes, **(extra or {})}
        atomic_write_json(self.progress_fpath(shard), record)

    def finish(self, listing: list[dict]) -> Shards:
        """Write the image index and the manifest (last), and open the result."""
        records = sorted((read_json(p, REPAIR) for p in (self.dpath / "progress").glob("*.json")),
                         key=lambda r: r["index"])
        shards = [{k: r[k] for k in ("index", "first_listed", "n_listed", "n_images", "files")} for r in records]
        lines = "".join(json.dumps(rec, sort_keys=True) + "\n" for rec in listing)
        atomic_write_bytes(self.dpath / "images.jsonl", lines.encode())
        n_images = sum(s["n_images"] for s in shards)
        manifest = {"format": FORMAT, **self.header, "n_listed": len(listing), "n_images": n_images,
                    "n_skipped": len(listing) - n_images, "shards": shards}
        atomic_write_json(self.dpath / "manifest.json", manifest)
        return Shards(self.dpath)


def write_arrays(out_dpath: str | Path, header: dict, listing: list[dict],
                 arrays: dict[str, np.ndarray], images_per_shard: int = 1024) -> Shards:
    """Write whole in-memory arrays as a shard folder (image-level embeddings, tests, conversions).

    `arrays` maps 'L{layer}/patches', 'L{layer}/cls', 'labels/patches', 'labels/images' to arrays whose
    first axis is the kept images; `listing` is every image record with 'row' set (None if skipped).
    The folder is `out_dpath/<hash>` where hash is header['hash'] or computed from the header.
    """
    header = dict(header)
    header.setdefault("hash", content_hash({k: v for k, v in header.items() if k != "hash"}))
    dpath = Path(out_dpath) / header["hash"]
    writer = ShardWriter(dpath, header)
    n_images = len(next(iter(arrays.values())))
    for s, start in enumerate(range(0, max(n_images, 1), images_per_shard)):
        stop = min(start + images_per_shard, n_images)
        parts = {f"{rel}-{s:05d}.npy": a[start:stop] for rel, a in arrays.items()}
        writer.write_shard(s, first_listed=start, n_listed=stop - start, arrays=parts)
    return writer.finish(listing)
