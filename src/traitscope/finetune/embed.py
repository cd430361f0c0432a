"""Image-level embeddings as shards: the CLS / pooled row of one layer, optionally L2-normalised.

`embed_images` runs the shards pipeline (`traitscope.shards.build`) with token kind `cls` only, so
the folder is a normal shard folder (rows in the source's sorted listing order, labels included) that
`traitscope train --tokens cls` reads. With `normalize`, each row is then divided by its L2 norm, as
in the faces experiment, and written as a second, derived shard folder whose manifest records
`normalize: "l2"` and the hash of the folder it was made from (`derived_from`).
"""

from pathlib import Path

from traitscope.backbones.base import Backbone
from traitscope.features.ranking import l2_normalize_rows
from traitscope.images import ImageSource
from traitscope.shards.build import build_shards
from traitscope.shards.store import Shards, content_hash, write_arrays

# Manifest fields that describe the stored arrays and are rewritten for a derived folder.
_PER_FOLDER = ("format", "hash", "n_listed", "n_images", "n_skipped", "shards")


def normalized_shards(shards: Shards, layer: int, out_dpath: str | Path) -> Shards:
    """A derived shard folder holding the L2-normalised CLS rows of `layer` (and the image labels)."""
    layer = shards.resolve(layer)
    cls_nd = l2_normalize_rows(shards.acts(layer, "cls")[:]).astype(shards.acts(layer, "cls").dtype)
    header = {k: v for k, v in shards.manifest.items() if k not in _PER_FOLDER}
    header.update({
        "layers": [layer],
        "token_kinds": ["cls"],
        "d_model": {str(layer): shards.d_model(layer)},
        "grid": {str(layer): list(shards.grid(layer))},
        "normalize": "l2",
        "derived_from": shards.hash,
    })
    header["hash"] = content_hash({"derived_from": shards.hash, "layer": layer, "normalize": "l2"})
    arrays = {f"L{layer}/cls": cls_nd}
    labels = shards.image_labels()
    if labels is not None:
        arrays["labels/images"] = labels
    dpath = Path(out_dpath) / header["hash"]
    if (dpath / "manifest.json").is_file():
        return Shards(dpath)
    return write_arrays(out_dpath, header, shards.listing(), arrays,
                        images_per_shard=int(header.get("images_per_shard", 1024)))


def embed_images(backbone: Backbone, source: ImageSource, out_dpath: str | Path, layer: int = -1,
                 normalize: bool = False, batch_size: int = 64, verbose: bool = True) -> Shards:
    """The CLS / pooled row of `layer` for every image, as a float32 shard folder under `out_dpath`.

    Returns the normalised folder when `normalize` is set (the raw one is kept beside it).
    """
    shards = build_shards(source, backbone, [layer], out_dpath, token_kinds=["cls"], dtype="float32",
                          batch_size=batch_size, verbose=verbose)
    return normalized_shards(shards, layer, out_dpath) if normalize else shards
