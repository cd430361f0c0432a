"""Shard folders written from in-memory arrays, for tests that need exact, hand-made activations."""

import numpy as np

from traitscope.shards.store import write_arrays

LAYER = 2
WEIGHTS = "ab" * 32


def make_shards(root, acts, patch_labels=None, image_labels=None, cls=None, model="toy", weights=WEIGHTS,
                layer=LAYER, grid=None, tag="", images_per_shard=10, label_names=None, preprocess=None,
                image_size=(32, 32)):
    """A shard folder from in-memory arrays; acts (n_images, n_patches, d_model)."""
    n_images, n_p, d_model = acts.shape
    grid = grid or (1, n_p)
    names = label_names or {}
    header = {"model": {"name": model, "family": "test", "n_layers": 6, "d_model": d_model, "weights_sha256": weights},
              "layers": [layer], "token_kinds": ["patches", "cls"], "d_model": {str(layer): d_model},
              "grid": {str(layer): list(grid)}, "layout": {"n_cls": 1, "n_registers": 0}, "preprocess": preprocess or {},
              "dtype": "float16", "images_root": str(root), "tag": tag,
              "patch_labels": names.get("patch", [f"p{j}" for j in range(patch_labels.shape[-1])]
                                         if patch_labels is not None else []),
              "image_labels": names.get("image", [f"i{j}" for j in range(image_labels.shape[-1])]
                                         if image_labels is not None else [])}
    listing = [{"index": i, "path": f"{i}.png", "width": image_size[0], "height": image_size[1], "label": None,
                "row": i, "skipped": None} for i in range(n_images)]
    arrays = {f"L{layer}/patches": acts.astype(np.float16),
              f"L{layer}/cls": (cls if cls is not None else acts.mean(1)).astype(np.float16)}
    if patch_labels is not None:
        arrays["labels/patches"] = patch_labels.astype(np.uint8)
    if image_labels is not None:
        arrays["labels/images"] = image_labels.astype(np.uint8)
    return write_arrays(root, header, listing, arrays, images_per_shard=images_per_shard)
