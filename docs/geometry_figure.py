"""Draws docs/geometry.png: one fish photo as the model sees it under each `--geometry`, with its patch grid.

    python docs/geometry_figure.py [../shared/data/fishvista_demo/UWZM-F-0000232.JPG]

Patches of pure padding are shaded: they are never trained on, counted or drawn.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from traitscope.backbones.base import GEOMETRIES
from traitscope.backbones.hf_vit import DINOV2_PREPROCESS
from traitscope.images import FolderSource, load_image, median_aspect

FISH = Path(__file__).resolve().parents[2] / "shared" / "data" / "fishvista_demo"
PATCH = 14
FONT = ImageFont.load_default(size=13)


def panel(image: Image.Image, geometry: str, aspect: float) -> Image.Image:
    """The model's input under `geometry` at 224 px, its patch grid drawn, padding patches shaded."""
    pre = DINOV2_PREPROCESS.with_geometry(geometry, 224, PATCH, aspect)
    seen = pre.crop_image(image)
    grid = (pre.input_hw[0] // PATCH, pre.input_hw[1] // PATCH)
    valid = pre.valid_patches(*image.size, grid)
    overlay = Image.new("RGBA", seen.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for r, c in zip(*np.nonzero(~valid)):
        draw.rectangle((c * PATCH, r * PATCH, (c + 1) * PATCH, (r + 1) * PATCH), fill=(255, 60, 60, 90))
    for x in range(0, seen.width + 1, PATCH):
        draw.line((x, 0, x, seen.height), fill=(255, 255, 255, 70))
    for y in range(0, seen.height + 1, PATCH):
        draw.line((0, y, seen.width, y), fill=(255, 255, 255, 70))
    out = Image.alpha_composite(seen.convert("RGBA"), overlay).convert("RGB")
    caption = (f"{geometry}: {grid[0]}x{grid[1]} patches, {pre.seen_fraction(*image.size):.0%} of the photo seen, "
               f"{int(valid.sum())} patches used")
    framed = Image.new("RGB", (max(out.width, 450), out.height + 18), "white")
    framed.paste(out, (0, 18))
    ImageDraw.Draw(framed).text((2, 2), caption, fill="black", font=FONT)
    return framed


def main() -> None:
    fpath = Path(sys.argv[1]) if len(sys.argv) > 1 else FISH / "UWZM-F-0000232.JPG"
    image = load_image(fpath)
    source = FolderSource(fpath.parent)
    aspect = median_aspect(source, source.records())
    panels = [panel(image, geometry, aspect) for geometry in ("center-crop", "squash", "letterbox", "grid")]
    assert set(GEOMETRIES) == {"center-crop", "squash", "letterbox", "grid"}
    original = image.copy()
    original.thumbnail((420, 420))
    framed = Image.new("RGB", (original.width, original.height + 18), "white")
    framed.paste(original, (0, 18))
    ImageDraw.Draw(framed).text((2, 2), f"the photo ({image.width}x{image.height} px)", fill="black", font=FONT)
    panels.insert(0, framed)
    gap = 8
    width = max(p.width for p in panels)
    figure = Image.new("RGB", (width, sum(p.height for p in panels) + gap * (len(panels) - 1)), "white")
    y = 0
    for p in panels:
        figure.paste(p, (0, y))
        y += p.height + gap
    out = Path(__file__).resolve().parent / "geometry.png"
    figure.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)  # small in git
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
