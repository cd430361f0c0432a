"""What every image source provides, and the one way images are decoded.

A source lists its images once, in a deterministic order, and then loads them one by one. Every
source decodes through `load_image`, so EXIF orientation, transparency, odd modes and broken files are
handled the same way whether the bytes come from a folder, a Hugging Face dataset or the synthetic set.
"""

import contextlib
import errno
import io
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from traitscope.backbones.base import Preprocess
from traitscope.errors import TraitscopeError


class ImageError(TraitscopeError):
    """One image cannot be used; `reason` says why in a few words (stored as the image's skip reason)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Decoded(NamedTuple):
    """An image as decoded for a model: possibly at a reduced size (JPEG 1/2, 1/4 or 1/8 scale)."""

    image: Image.Image
    """Upright RGB; smaller than the picture when `box` is set."""
    size: tuple[int, int]
    """The picture's own upright (width, height)."""
    box: tuple[float, float, float, float] | None
    """The region of `image` that holds the whole picture when it was decoded at a reduced size, else None."""


MinSize = Callable[[int, int], tuple[int, int]]
"""(width, height) of a picture -> the smallest (width, height) it may be decoded at (`Preprocess.resized_size`)."""


class ImageSource:
    """A list of images with optional per-image and per-patch labels.

    Subclasses set the attributes below in `__init__` and implement `records`, `load` and `identity`;
    the label methods return None unless the source has labels of that kind.
    """

    root: Path
    """Recorded as the shards' `images_root`; record paths are relative to it (virtual for datasets)."""
    spec: str
    """The string `open_source` takes to open this source again (what a later stage reopens)."""
    image_label_names: list[str] = []
    """Names of the per-image labels, in column order; empty when there are none."""
    patch_label_names: list[str] = []
    """Names of the per-patch labels, in column order; empty when there are none."""

    def records(self) -> list[dict]:
        """Every listed image in a deterministic order: dicts with `index`, `path` and `label` (str or None)."""
        raise NotImplementedError

    def load(self, record: dict) -> Image.Image:
        """The image as RGB, upright; raises ImageError for a file that cannot be decoded."""
        raise NotImplementedError

    def decode(self, record: dict, min_size: MinSize | None = None) -> Decoded:
        """The image for a model; sources of JPEG files decode it at a reduced size no smaller than
        `min_size(width, height)` when that is at least half the picture's size (others ignore it)."""
        image = self.load(record)
        return Decoded(image, image.size, None)

    def jpeg(self, record: dict) -> tuple[bytes, tuple[int, int], int] | None:
        """(file bytes, upright (width, height), EXIF orientation) when the image is a JPEG file a
        decoder elsewhere (a GPU's) can take as is; None otherwise (then `decode` it)."""
        return None

    def image_labels(self, record: dict) -> np.ndarray | None:
        """(n_image_labels,) uint8 multi-hot, or None when the source has no per-image labels."""
        return None

    def patch_labels(self, record: dict, preprocess: Preprocess, grid: tuple[int, int]) -> np.ndarray | None:
        """(rows * cols, n_patch_labels) uint8 for the patches the model sees, or None without masks."""
        return None

    def identity(self) -> dict:
        """JSON-able description of the content, for content hashing (see each source for what it holds)."""
        raise NotImplementedError

    def image_size(self, record: dict) -> tuple[int, int]:
        """(width, height) of the upright image; sources that can read it from a header override this."""
        return self.load(record).size

    def __len__(self) -> int:
        return len(self.records())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


# Pillow formats that are identified but never decoded here (stubs, vector or video formats).
_NOT_IMAGES = {".bufr", ".grib", ".h5", ".hdf", ".mpeg", ".mpg", ".wmf", ".emf", ".eps", ".ps"}


def image_extensions() -> set[str]:
    """Lower-case file extensions (with the dot) of the raster formats Pillow can open."""
    registered = Image.registered_extensions()
    return {ext for ext, fmt in registered.items() if fmt in Image.OPEN and ext not in _NOT_IMAGES}


MAX_FILE_BYTES = 256 << 20
"""Image files larger than this (256 MiB) are skipped unread."""
# Pixel counts are checked from the header before anything is decoded (`check_pixels`, against
# Pillow's own MAX_IMAGE_PIXELS, about 89 megapixels: 270 MB per decoding thread), so Pillow's warning
# for images between its limit and twice it would only repeat what the skip reason says.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def file_problem(fpath: Path) -> str | None:
    """Why a listed path cannot be read as an image file (dangling or looping link, FIFO, device,
    folder, too large), or None. Links are followed; nothing is opened."""
    try:
        st = os.stat(fpath)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop"
        if err.errno == errno.ENOENT and os.path.islink(fpath):
            return f"dangling symbolic link (to {os.readlink(fpath)})"
        return f"cannot read file: {err.strerror or err}"
    if not stat.S_ISREG(st.st_mode):
        kind = ("FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "folder"
                if stat.S_ISDIR(st.st_mode) else "special file")
        return f"not a regular file: a {kind}{' (through a link)' if os.path.islink(fpath) else ''}"
    if st.st_size > MAX_FILE_BYTES:
        return f"file of {st.st_size / 2**20:.0f} MiB is over the {MAX_FILE_BYTES >> 20} MiB limit for an image"
    return None


@contextlib.contextmanager
def open_regular(fpath: str | Path) -> Iterator[BinaryIO]:
    """A regular file of at most MAX_FILE_BYTES opened for reading, or ImageError. Never blocks on a
    FIFO and never reads a device: the file is opened without waiting and checked before any read."""
    try:
        fd = os.open(fpath, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise ImageError(file_problem(Path(fpath)) or f"cannot read file: {err.strerror or err}") from err
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
            raise ImageError(file_problem(Path(fpath)) or "not a regular file")
        yield f


def read_file(fpath: str | Path) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES (see `open_regular`), or ImageError."""
    with open_regular(fpath) as f:
        return _read_bounded(f)


def _read_bounded(f: BinaryIO) -> bytes:
    """At most MAX_FILE_BYTES from an open file (one that grows past it while read is an ImageError)."""
    try:
        data = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise ImageError(f"cannot read file: {err.strerror or err}") from err
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"over the {MAX_FILE_BYTES >> 20} MiB limit for an image")
    return data


def check_pixels(image: Image.Image) -> None:
    """ImageError for an image over Pillow's MAX_IMAGE_PIXELS (its size comes from the header: nothing
    is decoded). Raise `PIL.Image.MAX_IMAGE_PIXELS` to read larger images."""
    width, height = image.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ImageError(f"{width}x{height} is {width * height / 1e6:.0f} megapixels, over the "
                         f"{limit / 1e6:.0f}-megapixel limit (PIL.Image.MAX_IMAGE_PIXELS)")


def load_image(fp: str | Path | BinaryIO) -> Image.Image:
    """Decode an image file fully into an upright RGB image, or raise ImageError with the reason.

    Only a regular file of at most MAX_FILE_BYTES is read, and only an image of at most Pillow's
    MAX_IMAGE_PIXELS (from its header) is decoded. The file is checked with Pillow's `verify()`, then decoded with
    `load()`; truncated files fail (unless some other code set `PIL.ImageFile.LOAD_TRUNCATED_IMAGES`).
    The result has EXIF orientation applied, transparency composited on white, and greyscale, palette,
    CMYK and 16-bit data as 8-bit RGB.
    """
    return decode_image(fp).image


def decode_image(fp: str | Path | BinaryIO, min_size: MinSize | None = None) -> Decoded:
    """`load_image`, and with `min_size` a JPEG is decoded at the smallest of 1/2, 1/4 or 1/8 scale
    that is still at least `min_size(width, height)` of its upright size (libjpeg's reduced-size
    decoding, via Pillow's `draft`: the scaled DCT skips most of the work on large photos)."""
    data = read_file(fp) if isinstance(fp, (str, Path)) else _read_bounded(fp)
    if not data:
        raise ImageError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_pixels(image)
            image.verify()
        image = Image.open(io.BytesIO(data))
        full_size, box = image.size, None
        if min_size is not None and image.format == "JPEG":
            box = _draft(image, min_size)
        image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"too large to decode safely ({err})") from err
    except Image.UnidentifiedImageError as err:
        raise ImageError("not an image Pillow can identify") from err
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... for bad data
        raise ImageError(f"corrupt or truncated image: {err}") from err
    if box is not None:  # turn upright here, so that the box turns with the pixels
        image, full_size, box = _upright(image, full_size, box)
        return Decoded(to_rgb(image), full_size, box)
    image = to_rgb(image)
    return Decoded(image, image.size, None)


_TURNS_SIDEWAYS = (5, 6, 7, 8)
"""EXIF orientations that swap width and height."""


def _upright(image: Image.Image, size: tuple[int, int], box: tuple[float, float, float, float]):
    """A draft-decoded `image` turned as its EXIF orientation says (before `to_rgb`, which then finds
    it upright), with the picture's upright size and the box turned with it; as stored when the EXIF
    block cannot be read, as `to_rgb` does."""
    orientation = _orientation(image)
    if orientation == 1:
        return image, size, box
    w, h = image.size
    try:
        turned = ImageOps.exif_transpose(image)
    except Exception:
        return image, size, box
    # Where a point (x, y) of the stored image lands in the upright one, for each EXIF orientation.
    move = {2: lambda x, y: (w - x, y), 3: lambda x, y: (w - x, h - y), 4: lambda x, y: (x, h - y),
            5: lambda x, y: (y, x), 6: lambda x, y: (h - y, x), 7: lambda x, y: (h - y, w - x),
            8: lambda x, y: (y, w - x)}.get(orientation)
    if move is None:
        return image, size, box
    (x0, y0), (x1, y1) = move(box[0], box[1]), move(box[2], box[3])
    upright = size[::-1] if orientation in _TURNS_SIDEWAYS else size
    return turned, upright, (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def jpeg_file(fpath: str | Path) -> tuple[bytes, tuple[int, int], int] | None:
    """`ImageSource.jpeg` for a file: its bytes, upright size and orientation when it is a JPEG of 8-bit
    colour or grey that passes the header checks (`check_pixels`); None for anything else."""
    data = read_file(fpath)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            check_pixels(image)
            orientation = _orientation(image)
            width, height = image.size
    except ImageError:
        raise
    except Exception:
        return None  # `decode` says why
    upright = (height, width) if orientation in _TURNS_SIDEWAYS else (width, height)
    return data, upright, orientation if 1 <= orientation <= 8 else 1


def orient_tensor(image_chw, orientation: int):
    """A decoded (3, height, width) tensor turned upright as EXIF `orientation` says (as `to_rgb`)."""
    if orientation == 2:
        return image_chw.flip(2)
    if orientation == 3:
        return image_chw.flip(1, 2)
    if orientation == 4:
        return image_chw.flip(1)
    if orientation == 5:
        return image_chw.transpose(1, 2)
    if orientation == 6:
        return image_chw.transpose(1, 2).flip(2)
    if orientation == 7:
        return image_chw.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return image_chw.transpose(1, 2).flip(1)
    return image_chw


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _draft(image: Image.Image, min_size: MinSize) -> tuple[float, float, float, float] | None:
    """Ask the JPEG decoder for a reduced size no smaller than `min_size` of the upright picture;
    the region of the (stored, not yet rotated) decoded image that holds the picture, or None."""
    width, height = image.size
    rotated = _orientation(image) in _TURNS_SIDEWAYS
    need_w, need_h = min_size(*((height, width) if rotated else (width, height)))
    if rotated:
        need_w, need_h = need_h, need_w
    if 2 * need_w > width or 2 * need_h > height:
        return None
    result = image.draft("RGB" if image.mode == "RGB" else None, (need_w, need_h))
    if result is None or image.size == (width, height):
        return None
    return result[1]


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB: EXIF orientation applied, transparency composited on white."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block: the pixels are still fine, keep them as stored
        pass
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image))).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "1":
        image = image.convert("L")
    return image.convert("RGB")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Greyscale of any depth to 0..255: 16-bit ranges scale down, floats in [0, 1] scale up."""
    is_float = np.issubdtype(arr.dtype, np.floating)
    arr = np.nan_to_num(arr.astype(np.float64))
    hi = float(arr.max()) if arr.size else 0.0
    if is_float and 0.0 < hi <= 1.0 and float(arr.min()) >= 0.0:
        arr = arr * 255.0
    elif hi > 255.0:
        arr = arr / 257.0  # 65535 -> 255
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def oriented_size(fpath: Path) -> tuple[int, int]:
    """(width, height) of an image after EXIF orientation, read from the header only."""
    try:
        with open_regular(fpath) as f, Image.open(f) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"cannot read image header: {err}") from err
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)



def median_aspect(source: ImageSource, records: list[dict], n_max: int = 256) -> float:
    """Median width / height of up to `n_max` images spread evenly through `records` (what the 'grid'
    geometry shapes its patch grid by); unreadable images are left out."""
    if not records:
        raise TraitscopeError(f"no images in {source.spec}")
    picks = np.unique(np.linspace(0, len(records) - 1, min(n_max, len(records))).round().astype(int))
    aspects = []
    for i in picks:
        try:
            width, height = source.image_size(records[i])
        except ImageError:
            continue
        aspects.append(width / height)
    if not aspects:
        raise TraitscopeError(f"none of {len(picks)} images sampled from {source.spec} could be read")
    return float(np.median(aspects))
