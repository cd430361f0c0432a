"""Image sources: listing, decoding, labels, masks, Hugging Face datasets and the synthetic trait set."""

import colorsys
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from traitscope.backbones.base import Preprocess
from traitscope.errors import TraitscopeError
from traitscope.images import (
    FolderSource,
    ImageError,
    SyntheticSource,
    crop_mask,
    decode_image,
    ensure_synthetic,
    generate_synthetic,
    load_image,
    open_source,
    parse_synthetic_spec,
    patch_majority,
    preview,
)
from traitscope.images.hf_dataset import parse_spec
from traitscope.images.synthetic import COLOURS, IMAGE_LABELS, PATCH_LABELS
from locations import CELEBA

VIT = Preprocess(crop=224, resize=256)
"""The usual ViT geometry: shorter side to 256, centre crop 224, 16x16 patches of 14 px."""


def _save(fpath: Path, image: Image.Image, **kwargs) -> Path:
    fpath.parent.mkdir(parents=True, exist_ok=True)
    image.save(fpath, **kwargs)
    return fpath


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


# --- folders ---


def test_folder_listing_is_recursive_sorted_and_skips_hidden_and_non_images(tmp_path):
    for rel in ["b/2.png", "a/z.jpg", "a/sub/1.JPG", "c.webp", "B.png"]:
        _save(tmp_path / rel, _noise(8, 8))
    _save(tmp_path / ".hidden" / "x.png", _noise(8, 8))
    _save(tmp_path / "a" / ".x.png", _noise(8, 8))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "fake.jpg").write_text("a text file with an image name")

    expected = ["B.png", "a/sub/1.JPG", "a/z.jpg", "b/2.png", "c.webp", "fake.jpg"]
    source = open_source(str(tmp_path))
    records = source.records()
    assert [r["path"] for r in records] == expected
    assert [r["index"] for r in records] == list(range(len(expected)))
    assert all(r["label"] is None for r in records)
    assert source.image_label_names == [] and source.patch_label_names == []
    assert source.image_labels(records[0]) is None and source.patch_labels(records[0], VIT, (16, 16)) is None
    assert FolderSource(tmp_path).records() == records  # deterministic
    assert source.root == tmp_path

    with pytest.raises(ImageError, match="not an image"):
        source.load(records[-1])  # listed by its name, skipped when it fails to load
    copy = pickle.loads(pickle.dumps(source))  # sources travel to data-loader worker processes
    assert np.array_equal(np.asarray(copy.load(records[0])), np.asarray(source.load(records[0])))


def test_folder_identity_is_json_and_follows_file_sizes(tmp_path):
    _save(tmp_path / "a.png", _noise(8, 8))
    _save(tmp_path / "b.png", _noise(8, 8, seed=1))
    first = FolderSource(tmp_path).identity()
    assert json.loads(json.dumps(first)) == first
    assert first["files"] == [["a.png", (tmp_path / "a.png").stat().st_size], ["b.png", (tmp_path / "b.png").stat().st_size]]
    assert FolderSource(tmp_path).identity() == first
    _save(tmp_path / "b.png", _noise(16, 16, seed=1))
    assert FolderSource(tmp_path).identity() != first


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TraitscopeError, match="does not exist"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(TraitscopeError, match="no images"):
        open_source(str(tmp_path))


# --- decoding ---


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)  # left half red
    array[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to display
    fpath = _save(tmp_path / "rotated.jpg", Image.fromarray(array), exif=exif.tobytes(), quality=95)

    image = load_image(fpath)
    assert image.mode == "RGB" and image.size == (20, 40)
    pixels = np.asarray(image).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60  # the red half is now on top
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60


def _smooth_photo(width: int, height: int) -> Image.Image:
    """A large photo-like image: smooth colour fields with an off-centre disc, no symmetry."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((xx - 0.3 * width) ** 2 + (yy - 0.6 * height) ** 2) < (0.2 * min(width, height)) ** 2
    stripes = np.sin((xx + 2 * yy) / 40.0) > 0  # edges everywhere: a misplaced pixel shows
    rgb = np.stack([xx * 255 / width, 255 * stripes, 255 * disc], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_draft_decoding_gives_the_full_decodings_model_input(tmp_path, orientation):
    """A JPEG decoded at reduced size (never below what the Preprocess asks for) gives the model nearly
    the pixels of full decoding, whichever way the camera was turned; geometry and size are the full picture's."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    fpath = _save(tmp_path / "big.jpg", _smooth_photo(1907, 1301), exif=exif.tobytes(), quality=92)
    full = load_image(fpath)
    draft = decode_image(fpath, VIT.resized_size)
    assert draft.size == full.size and draft.box is not None
    assert min(draft.image.size) >= min(VIT.resized_size(*full.size)) and draft.image.size[0] < full.size[0] / 3
    want = np.asarray(VIT.crop_image(full)).astype(float)
    got = np.asarray(VIT.crop_image(draft.image, draft.size, draft.box)).astype(float)
    assert np.abs(got - want).mean() < 1.6  # of 255 (1.04 here); ignoring the box gives 3.3, a box turned wrong 5.7
    assert decode_image(fpath).box is None  # no min_size: full decoding, as load_image


def test_draft_leaves_small_jpegs_and_other_formats_alone(tmp_path):
    small = _save(tmp_path / "small.jpg", _smooth_photo(400, 300))
    png = _save(tmp_path / "big.png", _smooth_photo(1900, 1300))
    for fpath in (small, png):
        decoded = decode_image(fpath, VIT.resized_size)
        assert decoded.box is None and decoded.image.size == decoded.size == Image.open(fpath).size


def test_modes_become_8_bit_rgb(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent: white
    grey16 = np.array([[0, 32896], [65535, 65535]], dtype=np.uint16)
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    cases = {
        "rgba.png": (Image.fromarray(rgba, "RGBA"), {(0, 0): (255, 0, 0), (1, 0): (255, 255, 255)}),
        "la.png": (Image.fromarray(np.array([[[100, 255], [100, 0]]], dtype=np.uint8), "LA"),
                   {(0, 0): (100, 100, 100), (1, 0): (255, 255, 255)}),
        "grey.png": (Image.fromarray(np.array([[7, 200]], dtype=np.uint8), "L"), {(1, 0): (200, 200, 200)}),
        "grey16.png": (Image.fromarray(grey16), {(0, 0): (0, 0, 0), (1, 0): (128, 128, 128), (0, 1): (255, 255, 255)}),
        "palette.png": (palette, {(0, 0): (255, 255, 255), (1, 0): (0, 255, 0)}),
        "cmyk.jpg": (Image.new("CMYK", (8, 8), (0, 0, 0, 0)), {(0, 0): (255, 255, 255)}),
        "bilevel.bmp": (Image.new("1", (3, 3), 1), {(1, 1): (255, 255, 255)}),
    }
    for fname, (image, expected) in cases.items():
        fpath = _save(tmp_path / fname, image)
        loaded = load_image(fpath)
        assert loaded.mode == "RGB", fname
        for xy, rgb in expected.items():
            assert np.allclose(loaded.getpixel(xy), rgb, atol=3), (fname, xy, loaded.getpixel(xy))


def test_corrupt_truncated_and_fake_images_raise_image_error(tmp_path):
    good = _save(tmp_path / "good.jpg", _noise(128, 96), quality=95)
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG\n")
    (tmp_path / "empty.png").write_bytes(b"")
    png = io.BytesIO()
    _noise(32, 32).save(png, format="PNG")
    broken = bytearray(png.getvalue())
    broken[60:80] = b"\x00" * 20  # inside the image data: the chunk's CRC no longer matches
    (tmp_path / "badcrc.png").write_bytes(bytes(broken))

    source = FolderSource(tmp_path)
    by_path = {r["path"]: r for r in source.records()}
    assert source.load(by_path["good.jpg"]).size == (128, 96)
    reasons = {}
    for name in ["truncated.jpg", "text.jpg", "empty.png", "badcrc.png"]:
        with pytest.raises(ImageError) as info:
            source.load(by_path[name])
        assert isinstance(info.value, TraitscopeError)
        reasons[name] = info.value.reason
    assert "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["text.jpg"]
    assert "empty" in reasons["empty.png"]
    assert reasons["badcrc.png"]


# --- labels ---


def test_labels_from_class_folders(tmp_path):
    for rel in ["dogs/1.png", "cats/2.png", "cats/sub/3.png"]:
        _save(tmp_path / rel, _noise(8, 8))
    source = open_source(str(tmp_path), labels="folders")
    assert source.image_label_names == ["cats", "dogs"]
    assert [(r["path"], r["label"]) for r in source.records()] == [
        ("cats/2.png", "cats"), ("cats/sub/3.png", "cats"), ("dogs/1.png", "dogs")]
    assert source.image_labels(source.records()[2]).tolist() == [0, 1]
    _save(tmp_path / "loose.png", _noise(8, 8))
    with pytest.raises(TraitscopeError, match=r"1 of 4 images are not inside a class subfolder \(e.g. 'loose.png'"):
        open_source(str(tmp_path), labels="folders")


def test_labels_from_csv_class_column_and_attribute_columns(tmp_path):
    images = tmp_path / "images"
    for rel in ["a.png", "b.png", "sub/c.png"]:
        _save(images / rel, _noise(8, 8))

    classes = tmp_path / "classes.csv"
    classes.write_text("filename,species\na.png,trout\nsub/c.png,perch\nb.png,trout\nextra.png,pike\n")
    source = open_source(str(images), labels=str(classes))
    assert source.image_label_names == ["perch", "trout"]
    assert [r["label"] for r in source.records()] == ["trout", "trout", "perch"]
    assert source.image_labels(source.records()[2]).tolist() == [1, 0]

    attrs = tmp_path / "attrs.csv"  # basenames match when they are unique; 1/-1 and 0/1 both work
    attrs.write_text("image_id,Striped,Spotted\nc.png,1,-1\na.png,-1,1\nb.png,0,0\n")
    source = open_source(str(images), labels=str(attrs))
    assert source.image_label_names == ["Striped", "Spotted"]
    assert [r["label"] for r in source.records()] == [None, None, None]
    assert [source.image_labels(r).tolist() for r in source.records()] == [[0, 1], [0, 0], [1, 0]]


def test_label_file_mismatches_are_clear_errors(tmp_path):
    images = tmp_path / "images"
    for rel in ["a.png", "b.png", "c.png"]:
        _save(images / rel, _noise(8, 8))
    cases = {
        "missing.csv": ("path,label\na.png,x\nzz.png,y\n", r"2 of 3 images have no row \(e.g. 'b.png'"),
        "dupe.csv": ("path,label\na.png,x\na.png,y\nb.png,x\nc.png,x\n", "more than one row"),
        "nopath.csv": ("file_x,label\na.png,x\n", "no path column"),
        "notbinary.csv": ("path,Striped,colour\na.png,1,red\nb.png,0,blue\nc.png,1,red\n", "'colour' has a value 'red'"),
        "ragged.csv": ("path,label\na.png,x,extra\n", "line 2: 3 fields"),
    }
    for fname, (text, message) in cases.items():
        (tmp_path / fname).write_text(text)
        with pytest.raises(TraitscopeError, match=message):
            open_source(str(images), labels=str(tmp_path / fname))
    with pytest.raises(TraitscopeError, match="does not exist"):
        open_source(str(images), labels=str(tmp_path / "absent.csv"))


def test_labels_in_celeba_attribute_format(tmp_path):
    for rel in ["000001.jpg", "000002.jpg"]:
        _save(tmp_path / "faces" / rel, _noise(8, 8))
    (tmp_path / "list_attr.txt").write_text("2\nSmiling Young Bald\n000001.jpg  1 -1 -1\n000002.jpg -1  1 -1\n")
    source = open_source(str(tmp_path / "faces"), labels=str(tmp_path / "list_attr.txt"))
    assert source.image_label_names == ["Smiling", "Young", "Bald"]
    assert [source.image_labels(r).tolist() for r in source.records()] == [[1, 0, 0], [0, 1, 0]]
    (tmp_path / "bad_count.txt").write_text("5\nSmiling Young Bald\n000001.jpg  1 -1 -1\n000002.jpg -1  1 -1\n")
    with pytest.raises(TraitscopeError, match="says 5 rows but there are 2"):
        open_source(str(tmp_path / "faces"), labels=str(tmp_path / "bad_count.txt"))


@pytest.mark.skipif(not CELEBA.is_dir(), reason="shared CelebA sample not present")
def test_labels_from_the_real_celeba_attribute_file():
    attr_fpath = next(CELEBA.glob("list_attr_celeba*.txt"))
    source = open_source(str(CELEBA), labels=str(attr_fpath))
    records = source.records()
    assert len(records) == 32 and records[0]["path"] == "000001.jpg"
    assert len(source.image_label_names) == 40 and source.image_label_names[0] == "5_o_Clock_Shadow"
    # CelebA's first face: Arched_Eyebrows, Attractive are 1; 5_o_Clock_Shadow and Bald are -1.
    first = dict(zip(source.image_label_names, source.image_labels(records[0]).tolist()))
    assert first["Arched_Eyebrows"] == 1 and first["Attractive"] == 1
    assert first["5_o_Clock_Shadow"] == 0 and first["Bald"] == 0
    assert source.load(records[0]).size == (178, 218)


# --- masks ---


def test_crop_mask_follows_the_image_geometry_exactly():
    rng = np.random.default_rng(0)
    for width, height, preprocess in [(320, 256, VIT), (300, 517, VIT), (97, 61, Preprocess(crop=56, resize=64)),
                                      (400, 250, Preprocess(crop=224, resize=224, mode="squash"))]:
        ids = rng.integers(0, (1 << 24) - 1, size=(height, width))
        rgb = np.stack([(ids >> 16) & 255, (ids >> 8) & 255, ids & 255], axis=-1).astype(np.uint8)
        nearest = Preprocess(**{**preprocess.to_dict(), "interpolation": "nearest"})
        seen = np.asarray(nearest.crop_image(Image.fromarray(rgb))).astype(np.int64)
        assert np.array_equal(crop_mask(ids, preprocess), (seen[..., 0] << 16) | (seen[..., 1] << 8) | seen[..., 2])
        # ids beyond 24 bits are cropped through their ranks: the same pixels, the same ids
        assert np.array_equal(crop_mask(ids + (1 << 40), preprocess), crop_mask(ids, preprocess) + (1 << 40))


def test_patch_majority_on_a_known_mask():
    # 320x256 under the ViT geometry: no resize (shorter side is 256), crop x 48..272, y 16..240.
    mask = np.zeros((256, 320), dtype=np.int64)
    mask[16:16 + 3 * 14, 48 + 2 * 14:48 + 5 * 14] = 1  # patches rows 0-2, cols 2-4
    mask[16 + 5 * 14:16 + 5 * 14 + 8, 48:48 + 14] = 2  # 8 of 14 rows of patch (5, 0): a majority
    mask[16 + 6 * 14:16 + 6 * 14 + 6, 48:48 + 14] = 2  # 6 of 14 rows of patch (6, 0): a minority
    mask[:16, :] = 3  # outside the crop: never seen
    ids = patch_majority(mask, VIT, (16, 16)).reshape(16, 16)
    expected = np.zeros((16, 16), dtype=np.int64)
    expected[0:3, 2:5] = 1
    expected[5, 0] = 2
    assert np.array_equal(ids, expected)

    # 512x512: resized to 256 (scale 1/2), crop offset 16 in the resized image, 32 in the original.
    mask = np.zeros((512, 512), dtype=np.int64)
    mask[32 + 2 * 28:32 + 4 * 28, 32 + 7 * 28:32 + 9 * 28] = 5
    ids = patch_majority(mask, VIT, (16, 16)).reshape(16, 16)
    assert set(zip(*np.nonzero(ids == 5))) == {(r, c) for r in (2, 3) for c in (7, 8)}
    assert (ids[ids != 5] == 0).all()
    # A coarser grid (a ResNet's 7x7 map over 224 px: 32-px cells).
    assert patch_majority(mask, VIT, (7, 7)).reshape(7, 7)[1, 3] == 5


def test_folder_masks_give_per_patch_one_hot_labels(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    _save(images / "fish" / "a.jpg", _noise(320, 256))
    mask = np.zeros((256, 320), dtype=np.uint8)
    mask[16:16 + 28, 48:48 + 28] = 1  # patches (0,0), (0,1), (1,0), (1,1): fin
    mask[16 + 14 * 15:, 48 + 14 * 15:48 + 224] = 2  # the last patch: eye
    mask[16 + 14 * 8:16 + 14 * 9, 48 + 14 * 8:48 + 14 * 9] = 9  # an id with no name: no label
    _save(masks / "fish" / "a.png", Image.fromarray(mask, "L"))
    (masks / "labels.json").write_text(json.dumps({"0": "background", "1": "fin", "2": "eye"}))

    source = open_source(str(images), masks=str(masks))
    assert source.patch_label_names == ["background", "fin", "eye"]
    # A masks folder inside the images folder is not listed as images.
    _save(tmp_path / "nested" / "a.png", _noise(8, 8))
    _save(tmp_path / "nested" / "masks" / "a.png", Image.new("L", (8, 8), 0))
    (tmp_path / "nested" / "masks" / "labels.txt").write_text("background\n")
    assert [r["path"] for r in FolderSource(tmp_path / "nested", masks=tmp_path / "nested" / "masks").records()] == ["a.png"]
    record = source.records()[0]
    labels = source.patch_labels(record, VIT, (16, 16))
    assert labels.shape == (256, 3) and labels.dtype == np.uint8
    assert labels[[0, 1, 16, 17]].tolist() == [[0, 1, 0]] * 4
    assert labels[255].tolist() == [0, 0, 1]
    assert labels[8 * 16 + 8].tolist() == [0, 0, 0]
    assert labels[:, 0].sum() == 256 - 4 - 1 - 1

    (masks / "labels.json").unlink()
    (masks / "labels.txt").write_text("background\nfin\neye\n")
    assert open_source(str(images), masks=str(masks)).patch_label_names == ["background", "fin", "eye"]

    _save(masks / "fish" / "a.png", Image.fromarray(mask[:200], "L"))
    with pytest.raises(ImageError, match="mask is 320x200 but the image is 320x256"):
        open_source(str(images), masks=str(masks)).patch_labels(record, VIT, (16, 16))
    _save(images / "b.png", _noise(8, 8))
    with pytest.raises(TraitscopeError, match=r"1 of 2 images have no mask .*'b.png'"):
        open_source(str(images), masks=str(masks))
    (masks / "labels.txt").unlink()
    with pytest.raises(TraitscopeError, match="no labels.json, labels.txt or class_dict.csv"):
        open_source(str(images), masks=str(masks))


def test_colour_masks_named_by_colour(tmp_path):
    """RGB masks whose colours a labels.json or a class_dict.csv (name, r, g, b) names, white included."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    _save(images / "a.jpg", _noise(320, 256))
    mask = np.zeros((256, 320, 3), dtype=np.uint8)
    mask[16:16 + 28, 48:48 + 28] = (128, 64, 128)  # patches (0,0), (0,1), (1,0), (1,1): road
    mask[16 + 14 * 15:, 48 + 14 * 15:48 + 224] = 255  # the last patch: white, more than 24 bits as id + 1
    mask[16 + 14 * 8:16 + 14 * 9, 48 + 14 * 8:48 + 14 * 9] = (1, 2, 3)  # a colour with no name: no label
    _save(masks / "a.png", Image.fromarray(mask, "RGB"))
    (masks / "labels.json").write_text(json.dumps({"#000000": "void", "128, 64, 128": "road", "(255,255,255)": "line"}))
    expected = np.zeros((256, 3), dtype=np.uint8)
    expected[:, 0] = 1
    expected[[0, 1, 16, 17]] = [0, 1, 0]
    expected[255] = [0, 0, 1]
    expected[8 * 16 + 8] = 0

    source = open_source(str(images), masks=str(masks))
    assert source.patch_label_names == ["void", "road", "line"]
    assert np.array_equal(source.patch_labels(source.records()[0], VIT, (16, 16)), expected)

    (masks / "labels.json").unlink()
    (masks / "class_dict.csv").write_text("name,r,g,b\nRoad,128,64,128\nVoid,0,0,0\nLine,255,255,255\n\n")
    source = open_source(str(images), masks=str(masks))
    assert source.patch_label_names == ["Void", "Road", "Line"]  # by colour, as ids go by id
    assert np.array_equal(source.patch_labels(source.records()[0], VIT, (16, 16)), expected)
    assert source.identity()["masks"]["colours"] is True
    _save(masks / "a.png", Image.fromarray(mask[..., 0], "L"))  # colours named, but the mask holds ids
    with pytest.raises(ImageError, match="mask a.png is L, one id per pixel, but the masks' names are colours"):
        source.patch_labels(source.records()[0], VIT, (16, 16))
    colours, index = np.unique(mask.reshape(-1, 3), axis=0, return_inverse=True)
    palette = Image.fromarray(index.reshape(mask.shape[:2]).astype(np.uint8), "P")
    palette.putpalette(colours.astype(np.uint8).ravel().tolist())
    _save(masks / "a.png", palette)  # a palette image: its colours count, not its indices
    assert np.array_equal(source.patch_labels(source.records()[0], VIT, (16, 16)), expected)
    _save(masks / "a.png", Image.fromarray(mask, "RGB"))

    for text, error in [("name,red\nroad,1\n", "must name the columns name, r, g, b"),
                        ("name,r,g,b\nroad,1,2,x\n", "line 2: r, g, b must be integers"),
                        ("name,r,g,b\nroad,1,2,3\nlane,1,2,3\n", "line 3: the colour of 'lane' is also 'road'")]:
        (masks / "class_dict.csv").write_text(text)
        with pytest.raises(TraitscopeError, match=error):
            open_source(str(images), masks=str(masks))
    # Masks named with a suffix after the image's name (CamVid's a_L.png), as long as every one has it
    (masks / "class_dict.csv").write_text("name,r,g,b\nRoad,128,64,128\nVoid,0,0,0\nLine,255,255,255\n")
    (masks / "a.png").rename(masks / "a_L.png")
    source = open_source(str(images), masks=str(masks))
    assert np.array_equal(source.patch_labels(source.records()[0], VIT, (16, 16)), expected)
    assert source.identity()["masks"]["suffix"] == "_L"
    _save(images / "b.jpg", _noise(320, 256))
    _save(masks / "b_mask.png", Image.fromarray(mask, "RGB"))
    with pytest.raises(TraitscopeError, match="1 of 2 images have no mask .* 'b.jpg' needs 'b_L.png'"):
        open_source(str(images), masks=str(masks))
    (masks / "a_L.png").rename(masks / "a.png")
    (masks / "a_other.png").write_bytes((masks / "a.png").read_bytes())
    with pytest.raises(TraitscopeError, match="'b.jpg' needs 'b.png', or every mask the same suffix .* as 'b_L.png'"):
        open_source(str(images), masks=str(masks))
    (images / "b.jpg").unlink()

    (masks / "class_dict.csv").unlink()
    (masks / "labels.json").write_text(json.dumps({"0": "void", "#804080": "road"}))
    with pytest.raises(TraitscopeError, match="all ids or all colours, not both \\('0' and '#804080'\\)"):
        open_source(str(images), masks=str(masks))

    (masks / "labels.json").write_text(json.dumps({"0": "void", "1": "road"}))  # ids, but the mask is RGB
    source = open_source(str(images), masks=str(masks))
    with pytest.raises(ImageError, match="mask a.png is RGB: .* or name their colours"):
        source.patch_labels(source.records()[0], VIT, (16, 16))


# --- Hugging Face datasets ---


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({
        "picture": datasets.Image(),
        "label": datasets.ClassLabel(names=["cat", "dog"]),
        "tags": datasets.Sequence(datasets.ClassLabel(names=["indoor", "outdoor"])),
    })
    images = [{"bytes": _png_bytes(_noise(20, 10, seed=i)), "path": None} for i in range(3)]
    images[2] = {"bytes": b"definitely not a png", "path": None}
    data = {"picture": images, "label": [1, 0, -1], "tags": [[0], [0, 1], []]}
    train = datasets.Dataset.from_dict(data, features=features)
    train.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(str(tmp_path / "both"))

    source = open_source(f"hf:{tmp_path / 'single'}")
    records = source.records()
    assert [r["path"] for r in records] == ["data/00000000", "data/00000001", "data/00000002"]  # no split name
    assert [r["label"] for r in records] == ["dog", "cat", None]
    assert source.image_label_names == ["cat", "dog"]
    assert source.image_labels(records[0]).tolist() == [0, 1]
    assert source.image_labels(records[2]).tolist() == [0, 0]  # -1: no label
    image = source.load(records[0])
    assert image.mode == "RGB" and image.size == (20, 10)
    assert np.array_equal(np.asarray(image), np.asarray(_noise(20, 10, seed=0)))
    with pytest.raises(ImageError, match="not an image"):
        source.load(records[2])
    identity = source.identity()
    assert identity["kind"] == "hf" and identity["n_rows"] == 3 and identity["fingerprint"]
    assert open_source(source.spec).identity() == identity
    assert pickle.loads(pickle.dumps(source)).load(records[1]).size == (20, 10)

    with pytest.raises(TraitscopeError, match="has splits train, test"):
        open_source(f"hf:{tmp_path / 'both'}")
    test = open_source(f"hf:{tmp_path / 'both'}:test")
    assert [r["path"] for r in test.records()] == ["test/00000000"]
    assert test.root == tmp_path / "both"
    with pytest.raises(TraitscopeError, match="no split 'valid'"):
        open_source(f"hf:{tmp_path / 'both'}:valid")

    multi = datasets.Dataset.from_dict({"picture": images[:2], "tags": [[1], [0, 1]]}, features=datasets.Features(
        {"picture": datasets.Image(), "tags": datasets.Sequence(datasets.ClassLabel(names=["indoor", "outdoor"]))}))
    multi.save_to_disk(str(tmp_path / "multi"))
    source = open_source(f"hf:{tmp_path / 'multi'}")
    assert source.image_label_names == ["indoor", "outdoor"]
    assert [source.image_labels(r).tolist() for r in source.records()] == [[0, 1], [1, 1]]
    assert [r["label"] for r in source.records()] == [None, None]

    with pytest.raises(TraitscopeError, match="apply to image folders"):
        open_source(f"hf:{tmp_path / 'single'}", labels="folders")
    with pytest.raises(TraitscopeError, match="cannot load Hugging Face dataset"):
        open_source(f"hf:{tmp_path / 'absent'}")
    assert parse_spec("hf:user/fish:train[:100]") == ("user/fish", "train[:100]")
    assert parse_spec("hf:/data/fish") == ("/data/fish", None)


# --- the synthetic trait set ---


def _files(dpath: Path) -> dict[str, bytes]:
    return {p.relative_to(dpath).as_posix(): p.read_bytes() for p in sorted(dpath.rglob("*")) if p.is_file()}


def test_synthetic_set_is_deterministic_for_a_seed(tmp_path):
    first = _files(generate_synthetic(tmp_path / "a", n_images=6, seed=3))
    second = _files(generate_synthetic(tmp_path / "b", n_images=6, seed=3))
    assert first == second
    assert len([k for k in first if k.startswith("images/")]) == 6 and "traits.json" in first
    other = _files(generate_synthetic(tmp_path / "c", n_images=6, seed=4))
    assert other["images/00000.png"] != first["images/00000.png"]
    # Image i depends only on (seed, i): a smaller set is the start of a larger one.
    smaller = _files(generate_synthetic(tmp_path / "d", n_images=2, seed=3))
    assert smaller["images/00001.png"] == first["images/00001.png"]
    with pytest.raises(TraitscopeError, match="not empty"):
        generate_synthetic(tmp_path / "a", n_images=2)


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synthetic") / "set", n_images=40, seed=0)


def test_synthetic_labels_match_the_pixels(synthetic_set):
    source = open_source(str(synthetic_set))
    assert isinstance(source, SyntheticSource)
    assert source.patch_label_names == PATCH_LABELS and len(PATCH_LABELS) == 15
    assert pickle.loads(pickle.dumps(source)).image_labels(source.records()[0]).sum() >= 4
    assert source.image_label_names == IMAGE_LABELS
    column = {name: j for j, name in enumerate(PATCH_LABELS)}
    hue_errors = {name: [] for name in COLOURS}
    saturation = {"object": [], "background": []}
    totals = np.zeros(len(PATCH_LABELS), dtype=np.int64)
    for record in source.records():
        labels = source.patch_labels(record, VIT, (16, 16))
        assert labels.shape == (256, 15) and labels.dtype == np.uint8
        # Every patch is either background or one object with exactly one value per trait.
        assert np.array_equal(labels.sum(axis=1), np.where(labels[:, column["background"]] == 1, 1, 4))
        totals += labels.sum(axis=0, dtype=np.int64)
        # All objects lie inside the crop, so the image labels are the union of the patch labels.
        assert np.array_equal(source.image_labels(record), labels[:, :14].max(axis=0))

        crop = np.asarray(VIT.crop_image(source.load(record))).astype(np.float64) / 255
        patch_rgb = crop.reshape(16, 14, 16, 14, 3).mean(axis=(1, 3)).reshape(256, 3)
        hsv = np.array([colorsys.rgb_to_hsv(*rgb) for rgb in patch_rgb])
        saturation["background"] += hsv[labels[:, column["background"]] == 1, 1].tolist()
        saturation["object"] += hsv[labels[:, column["background"]] == 0, 1].tolist()
        for name, hue in COLOURS.items():
            rows = labels[:, column[f"colour:{name}"]] == 1
            diff = np.abs((hsv[rows, 0] * 360 - hue + 180) % 360 - 180)
            hue_errors[name] += diff.tolist()

    for name, errors in hue_errors.items():
        errors = np.array(errors)
        assert len(errors) > 50, name
        assert np.median(errors) < 10, (name, np.median(errors))
        assert np.mean(errors < 30) > 0.95, (name, np.mean(errors < 30))
    assert np.median(saturation["object"]) > 0.5 > np.median(saturation["background"])
    # Every trait value covers enough patches in a small set to be learnable.
    counts = dict(zip(PATCH_LABELS, totals.tolist()))
    assert min(counts.values()) >= 150, counts


def test_synthetic_objects_span_several_patches(synthetic_set):
    source = SyntheticSource(synthetic_set)
    for record in source.records():
        ids = patch_majority(np.asarray(Image.open(synthetic_set / "masks" / record["path"])), VIT, (16, 16))
        for obj in source.objects(record):
            assert (ids == obj["id"]).sum() >= 9, (record["path"], obj)


def test_synthetic_cache_and_preview(tmp_path):
    source = open_source("synthetic:5:1", cache_dpath=tmp_path)
    dpath = tmp_path / "synthetic-5-1"
    assert source.spec == str(dpath) and source.root == dpath / "images"
    assert len(source.records()) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic-5-1"]  # no temporary folder left
    stamp = (dpath / "traits.json").stat().st_mtime_ns
    assert ensure_synthetic(5, 1, tmp_path) == dpath and (dpath / "traits.json").stat().st_mtime_ns == stamp
    assert open_source(str(dpath)).identity() == source.identity()

    fpath = preview(dpath, n_images=4)
    assert fpath == dpath / "preview.png"
    with Image.open(fpath) as image:
        assert image.width > 4 * 256 and image.height > 256

    assert parse_synthetic_spec("synthetic") == (1000, 0) and parse_synthetic_spec("synthetic:50:7") == (50, 7)
    with pytest.raises(TraitscopeError, match="synthetic:<n>:<seed>"):
        open_source("synthetic:many")
    with pytest.raises(TraitscopeError, match="apply to image folders"):
        open_source("synthetic:5:1", masks=str(tmp_path), cache_dpath=tmp_path)
