"""A synthetic image set with known visual traits, to check that SAE features line up with them.

Each 256x256 image holds 1-3 non-overlapping objects on a cluttered background. Every object has four
traits drawn uniformly and independently:

    shape    circle, square, triangle, cross        (squares, triangles and crosses rotated)
    colour   red, green, blue, yellow               (hue jittered by a few degrees, saturation and value varied)
    texture  solid, stripes, dots, checker          (the pattern is a darker or lighter shade of the same hue)
    size     small (56-68 px), large (92-112 px)    (shapes of one size have about the same area)

Backgrounds are desaturated gradients of varied tone with low-frequency blotches, thin distractor lines
and rings, and pixel noise over everything. Objects stay inside the central 224x224 crop that a
resize-256 / crop-224 model sees, with a margin, and even a small object spans about four 14-px patches.
Object positions are recorded in traits.json but are not labels.

On disk (`generate_synthetic`): `images/00000.png`, `masks/00000.png` (object ids: 0 background, 1..3
the objects in traits.json order) and `traits.json`, written last. The same seed gives the same bytes,
and image i depends only on (seed, i), so a larger set starts with the images of a smaller one.

Labels (`SyntheticSource`): per patch, the four traits of the object covering most of the patch's
pixels, or `background`; per image, the traits of every object in it (no `background`, always present).
"""

import colorsys
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from traitscope.backbones.base import Preprocess
from traitscope.errors import TraitscopeError
from traitscope.images.masks import patch_majority, read_mask
from traitscope.images.source import ImageSource, load_image

FORMAT = "traitscope-synthetic/1"
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": 0.0, "green": 125.0, "blue": 222.0, "yellow": 54.0}
"""Colour name -> base hue in degrees."""
TEXTURES = ("solid", "stripes", "dots", "checker")
SIZES = {"small": (56, 68), "large": (92, 112)}
"""Size name -> range of the object's extent (diameter of the equal-area circle) in pixels at 256 px."""
TRAITS = {"shape": SHAPES, "colour": tuple(COLOURS), "texture": TEXTURES, "size": tuple(SIZES)}
IMAGE_LABELS = [f"{trait}:{value}" for trait, values in TRAITS.items() for value in values]
"""Per-image label names: 14 traits."""
PATCH_LABELS = [*IMAGE_LABELS, "background"]
"""Per-patch label names: the 14 traits and `background`."""

DEFAULT_N_IMAGES = 1000
HUE_JITTER = 8.0
"""Largest hue shift in degrees from the colour's base hue."""
_GAP = 6
"""Smallest distance in pixels between two objects, and between an object and the crop's edge margin."""
# Shape proportions that give each shape the area of a circle whose diameter is the extent.
_SQUARE_SIDE = float(np.sqrt(np.pi) / 2)  # side of the square with the area of a unit-diameter circle
_TRIANGLE_R = float(np.sqrt(np.pi / (3 * np.sqrt(3))))  # circumradius of the equal-area equilateral triangle
_CROSS_ARM = 0.44  # arm width over arm length
_CROSS_LEN = float(np.sqrt((np.pi / 4) / (2 * _CROSS_ARM - _CROSS_ARM**2)))


def generate_synthetic(out_dpath: str | Path, n_images: int = DEFAULT_N_IMAGES, seed: int = 0, size: int = 256) -> Path:
    """Write the synthetic set into `out_dpath` (created; must be empty or absent) and return it."""
    if n_images < 1:
        raise TraitscopeError(f"the synthetic set needs at least one image (got {n_images})")
    if size < 128:
        raise TraitscopeError(f"synthetic images must be at least 128 px (got {size})")
    out_dpath = Path(out_dpath)
    if out_dpath.exists() and any(out_dpath.iterdir()):
        raise TraitscopeError(f"{out_dpath} is not empty; the synthetic set is written into a new folder")
    (out_dpath / "images").mkdir(parents=True, exist_ok=True)
    (out_dpath / "masks").mkdir(exist_ok=True)
    width = max(5, len(str(n_images - 1)))
    entries = []
    for i in range(n_images):
        image_hwc, mask_hw, objects = draw_image(seed, i, size)
        fname = f"{i:0{width}d}.png"
        Image.fromarray(image_hwc).save(out_dpath / "images" / fname, compress_level=1)
        Image.fromarray(mask_hw).save(out_dpath / "masks" / fname, compress_level=9)
        entries.append({"path": fname, "objects": objects})
    traits = {
        "format": FORMAT,
        "n_images": n_images,
        "seed": seed,
        "size": size,
        "patch_labels": PATCH_LABELS,
        "image_labels": IMAGE_LABELS,
        "traits": {trait: list(values) for trait, values in TRAITS.items()},
        "images": entries,
    }
    (out_dpath / "traits.json").write_text(json.dumps(traits, indent=1) + "\n")
    return out_dpath


def draw_image(seed: int, index: int, size: int = 256) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Image `index` of the set for `seed`: (size, size, 3) uint8 RGB, (size, size) uint8 object ids, objects."""
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _background(rng, size, yy, xx)
    mask = np.zeros((size, size), dtype=np.uint8)
    # Keep every object inside the central crop a resize-256 / crop-224 model sees, with a margin.
    margin = int(np.ceil(size * 16 / 256)) + 4
    scale = size / 256
    occupied = np.zeros((size, size), dtype=bool)  # objects grown by the gap
    objects: list[dict] = []
    n_wanted = int(rng.integers(1, 4))
    wanted = [{trait: str(values[rng.integers(len(values))]) for trait, values in TRAITS.items()} for _ in range(n_wanted)]
    wanted.sort(key=lambda t: t["size"] != "large")  # large ones first, small ones fill the gaps
    for traits in wanted:
        extent = float(rng.uniform(*SIZES[traits["size"]])) * scale
        lo, hi = margin + 0.3 * extent, size - margin - 0.3 * extent
        for _attempt in range(150):
            cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
            angle = float(rng.uniform(0, 2 * np.pi))
            grown = _shape_mask(traits["shape"], cx, cy, extent + 2 * _GAP, angle, size)
            inner = grown[margin - _GAP:size - margin + _GAP, margin - _GAP:size - margin + _GAP]
            if inner.sum() == grown.sum() and not (grown & occupied).any():
                break
        else:
            continue  # no room left: fewer objects in this image
        obj_mask = _shape_mask(traits["shape"], cx, cy, extent, angle, size)
        occupied |= grown
        base, shade = _object_colours(rng, traits["colour"])
        pattern = _texture(rng, traits["texture"], yy, xx, scale)
        colours = np.where(pattern[..., None], shade, base)
        image = np.where(obj_mask[..., None], colours, image)
        mask[obj_mask] = len(objects) + 1
        objects.append({
            "id": len(objects) + 1,
            **traits,
            "centre": [round(cx, 1), round(cy, 1)],
            "extent": round(extent, 1),
            "angle": round(float(np.degrees(angle)) % 360, 1),
            "rgb": [int(v) for v in np.round(base)],
        })
    noise_sigma = rng.uniform(2.0, 8.0)
    image = image + rng.normal(0.0, noise_sigma, size=image.shape).astype(np.float32)
    image_hwc = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image_hwc, mask, objects


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360) / 360, s, v), dtype=np.float32) * 255


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Desaturated gradient of random tone, low-frequency blotches, and thin distractor lines and rings."""
    tint = rng.uniform(0, 360)
    tone_a, tone_b = rng.uniform(0.12, 0.92, size=2)
    col_a = _hsv(tint + rng.uniform(-30, 30), rng.uniform(0, 0.22), tone_a)
    col_b = _hsv(tint + rng.uniform(-30, 30), rng.uniform(0, 0.22), tone_b)
    if rng.random() < 0.6:  # linear gradient at a random angle
        angle = rng.uniform(0, 2 * np.pi)
        t = (xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)
        t = (t - t.min()) / (t.max() - t.min())
    else:  # radial gradient around a random point
        cx, cy = rng.uniform(0, size, size=2)
        t = np.hypot(xx - cx, yy - cy)
        t = t / t.max()
    image = col_a + t[..., None] * (col_b - col_a)
    # Low-frequency blotches: a coarse random grid, upsampled smoothly.
    n_cells = int(rng.integers(3, 8))
    coarse = rng.normal(0, rng.uniform(4, 18), size=(n_cells, n_cells)).astype(np.float32)
    blotches = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    image = image + blotches[..., None]
    # Distractors: thin desaturated lines and rings (thinner than a patch, never object-coloured).
    layer = Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(2, 9))):
        colour = tuple(int(c) for c in _hsv(rng.uniform(0, 360), rng.uniform(0, 0.25), rng.uniform(0.05, 1.0)))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(-20, size + 20, size=4))
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(0, 4))):
        colour = tuple(int(c) for c in _hsv(rng.uniform(0, 360), rng.uniform(0, 0.25), rng.uniform(0.05, 1.0)))
        cx, cy = (float(v) for v in rng.uniform(0, size, size=2))
        r = float(rng.uniform(6, 30))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=int(rng.integers(1, 3)))
    return np.asarray(layer).astype(np.float32)


def _shape_mask(shape: str, cx: float, cy: float, extent: float, angle: float, size: int) -> np.ndarray:
    """(size, size) bool: the object's pixels."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        r = extent / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        if shape == "square":
            h = _SQUARE_SIDE * extent / 2
            corners = [(-h, -h), (h, -h), (h, h), (-h, h)]
        elif shape == "triangle":
            r = _TRIANGLE_R * extent
            corners = [(r * np.cos(a), r * np.sin(a)) for a in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6)]
        else:  # cross: two bars of length L and width w
            half_l, half_w = _CROSS_LEN * extent / 2, _CROSS_LEN * _CROSS_ARM * extent / 2
            corners = [(half_w, half_w), (half_w, half_l), (-half_w, half_l), (-half_w, half_w),
                       (-half_l, half_w), (-half_l, -half_w), (-half_w, -half_w), (-half_w, -half_l),
                       (half_w, -half_l), (half_w, -half_w), (half_l, -half_w), (half_l, half_w)]
        c, s = np.cos(angle), np.sin(angle)
        draw.polygon([(float(cx + x * c - y * s), float(cy + x * s + y * c)) for x, y in corners], fill=255)
    return np.asarray(canvas) > 0


def _object_colours(rng: np.random.Generator, colour: str) -> tuple[np.ndarray, np.ndarray]:
    """The object's base RGB and the shade its texture is drawn in: same hue, darker or lighter."""
    hue = COLOURS[colour] + rng.uniform(-HUE_JITTER, HUE_JITTER)
    sat = rng.uniform(0.7, 1.0)
    val = rng.uniform(0.85, 1.0) if colour == "yellow" else rng.uniform(0.6, 0.95)
    if rng.random() < 0.5:
        shade = _hsv(hue, sat, val * rng.uniform(0.45, 0.6))
    else:
        shade = _hsv(hue, sat * rng.uniform(0.35, 0.5), min(1.0, val * 1.15))
    return _hsv(hue, sat, val), shade


def _texture(rng: np.random.Generator, texture: str, yy: np.ndarray, xx: np.ndarray, scale: float) -> np.ndarray:
    """(size, size) bool: where the object shows its shade instead of its base colour."""
    if texture == "solid":
        return np.zeros(xx.shape, dtype=bool)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    if texture == "stripes":
        period = rng.uniform(10, 15) * scale
        return np.mod(u + rng.uniform(0, period), period) < period / 2
    if texture == "dots":
        spacing = rng.uniform(10, 13) * scale
        radius = rng.uniform(0.25, 0.32) * spacing
        du = np.mod(u + rng.uniform(0, spacing), spacing) - spacing / 2
        dv = np.mod(v + rng.uniform(0, spacing), spacing) - spacing / 2
        return du * du + dv * dv < radius * radius
    cell = rng.uniform(6, 9) * scale  # checker
    return (np.floor(u / cell) + np.floor(v / cell)).astype(np.int64) % 2 == 1


def default_cache_dpath() -> Path:
    """$TRAITSCOPE_CACHE, else $XDG_CACHE_HOME/traitscope, else ~/.cache/traitscope."""
    if os.environ.get("TRAITSCOPE_CACHE"):
        return Path(os.environ["TRAITSCOPE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "traitscope"


def ensure_synthetic(n_images: int = DEFAULT_N_IMAGES, seed: int = 0, cache_dpath: str | Path | None = None) -> Path:
    """`<cache>/synthetic-<n>-<seed>/`, generated first unless a complete copy is there.

    The set is written to a temporary folder beside it and renamed into place, so a half-written set
    (an interrupted run) is never taken for a complete one.
    """
    cache_dpath = Path(cache_dpath) if cache_dpath is not None else default_cache_dpath()
    dpath = cache_dpath / f"synthetic-{n_images}-{seed}"
    if (dpath / "traits.json").is_file():
        return dpath
    if dpath.exists():
        raise TraitscopeError(f"{dpath} exists but is not a complete synthetic set; delete it to regenerate")
    cache_dpath.mkdir(parents=True, exist_ok=True)
    tmp_dpath = cache_dpath / f".{dpath.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp_dpath, ignore_errors=True)
    print(f"generating the synthetic trait set ({n_images} images, seed {seed}) into {dpath}", file=sys.stderr, flush=True)
    try:
        generate_synthetic(tmp_dpath, n_images=n_images, seed=seed)
        try:
            tmp_dpath.rename(dpath)
        except OSError:
            if not (dpath / "traits.json").is_file():  # not another process finishing first
                raise
    finally:
        shutil.rmtree(tmp_dpath, ignore_errors=True)
    return dpath


def is_synthetic(dpath: str | Path) -> bool:
    """Whether a folder holds a complete synthetic set."""
    try:
        return json.loads((Path(dpath) / "traits.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class SyntheticSource(ImageSource):
    """A synthetic set written by `generate_synthetic`, with per-patch and per-image trait labels.

    Identity: kind, resolved root, generator format, seed, size, the sha256 of traits.json, and each
    image's relative path and size in bytes.
    """

    def __init__(self, dpath: str | Path):
        self.dpath = Path(os.path.abspath(Path(dpath).expanduser()))
        if not is_synthetic(self.dpath):
            raise TraitscopeError(f"{self.dpath} is not a complete synthetic set (no {FORMAT} traits.json)")
        raw = (self.dpath / "traits.json").read_bytes()
        self._traits = json.loads(raw)
        self._traits_sha256 = hashlib.sha256(raw).hexdigest()
        self.root = self.dpath / "images"
        self.spec = str(self.dpath)
        self.image_label_names = list(self._traits["image_labels"])
        self.patch_label_names = list(self._traits["patch_labels"])
        self._objects = {entry["path"]: entry["objects"] for entry in self._traits["images"]}
        self._paths = [entry["path"] for entry in self._traits["images"]]
        self._column = {name: j for j, name in enumerate(self.patch_label_names)}

    def records(self) -> list[dict]:
        return [{"index": i, "path": p, "label": None} for i, p in enumerate(self._paths)]

    def load(self, record: dict) -> Image.Image:
        return load_image(self.root / record["path"])

    def objects(self, record: dict) -> list[dict]:
        """The objects in an image, as in traits.json: id, shape, colour, texture, size, centre, extent, angle, rgb."""
        return self._objects[record["path"]]

    def _trait_columns(self, obj: dict) -> list[int]:
        return [self._column[f"{trait}:{obj[trait]}"] for trait in TRAITS]

    def image_labels(self, record: dict) -> np.ndarray:
        row = np.zeros(len(self.image_label_names), dtype=np.uint8)
        for obj in self.objects(record):
            row[self._trait_columns(obj)] = 1  # image labels are the patch labels without 'background'
        return row

    def patch_labels(self, record: dict, preprocess: Preprocess, grid: tuple[int, int]) -> np.ndarray:
        ids = patch_majority(read_mask(self.dpath / "masks" / record["path"]), preprocess, grid)
        out = np.zeros((len(ids), len(self.patch_label_names)), dtype=np.uint8)
        out[ids == 0, self._column["background"]] = 1
        for obj in self.objects(record):
            rows = np.flatnonzero(ids == obj["id"])
            for col in self._trait_columns(obj):
                out[rows, col] = 1
        return out

    def identity(self) -> dict:
        return {
            "kind": "synthetic",
            "root": str(self.root),
            "format": FORMAT,
            "seed": self._traits["seed"],
            "size": self._traits["size"],
            "traits_sha256": self._traits_sha256,
            "files": [[p, os.stat(self.root / p).st_size] for p in self._paths],
        }


def preview(dpath: str | Path, n_images: int = 8, out_fpath: str | Path | None = None) -> Path:
    """A PNG grid of the first images of a synthetic set over their object masks, each object captioned.

    Written to `out_fpath`, by default `<dpath>/preview.png`; returns its path.
    """
    source = SyntheticSource(dpath)
    records = source.records()[:n_images]
    size = int(source._traits["size"])
    cols = min(len(records), 4)
    n_rows = -(-len(records) // cols)
    pad = 6
    sheet = Image.new("RGB", (cols * 2 * (size + pad) + pad, n_rows * (size + pad) + pad), (255, 255, 255))
    font = _font(max(10, size // 22))
    for k, record in enumerate(records):
        x0 = pad + (k % cols) * 2 * (size + pad)
        y0 = pad + (k // cols) * (size + pad)
        sheet.paste(source.load(record), (x0, y0))
        mask = read_mask(source.dpath / "masks" / record["path"])
        panel = np.full((size, size, 3), 40, dtype=np.uint8)
        objects = source.objects(record)
        for obj in objects:
            panel[mask == obj["id"]] = obj["rgb"]
        panel_img = Image.fromarray(panel)
        draw = ImageDraw.Draw(panel_img)
        for obj in objects:
            text = f"{obj['size']} {obj['colour']}\n{obj['texture']}\n{obj['shape']}"
            cx, cy = obj["centre"]
            draw.multiline_text((cx, cy), text, fill=(0, 0, 0), font=font, anchor="mm", align="center",
                                stroke_width=2, stroke_fill=(255, 255, 255))
        sheet.paste(panel_img, (x0 + size + pad, y0))
    out_fpath = Path(out_fpath) if out_fpath is not None else Path(dpath) / "preview.png"
    sheet.save(out_fpath)
    return out_fpath


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType
        return ImageFont.load_default()
