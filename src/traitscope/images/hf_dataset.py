"""A Hugging Face `datasets` split as an image source: `hf:<name or local path>[:split]`.

A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` is opened with `load_from_disk`;
anything else goes to `load_dataset` (a hub id, which may need the network, or a local data folder).
The image column is the first `Image` feature; the label column is a `ClassLabel` (single label, the
one named 'label' preferred) or a list of `ClassLabel` (multi-label). Records have virtual paths
`<split>/<row:08d>`; images are decoded from the dataset's stored bytes with the same checks as files.
"""

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from traitscope.errors import TraitscopeError
from traitscope.images.source import ImageError, ImageSource, load_image

PREFIX = "hf:"


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'hf:name[:split]' -> (name, split or None). The split starts at the first ':' followed by no '/',
    so split slices pass through: 'hf:cifar10:train[:1000]' -> ('cifar10', 'train[:1000]')."""
    rest = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    name, sep, split = rest.partition(":")
    if not sep or not split or "/" in split:
        name, split = rest, ""
    if not name:
        raise TraitscopeError("hf: needs a dataset name or a saved dataset folder, e.g. hf:cifar10:test")
    return name, split or None


class HFDatasetSource(ImageSource):
    """One split of a Hugging Face dataset.

    Identity: kind, the dataset name (resolved path for a local folder), split, the dataset's
    fingerprint (which `datasets` derives from its content and history), row count, and the columns used.
    """

    def __init__(self, spec: str):
        try:
            import datasets
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise TraitscopeError("hf: sources need the 'datasets' package (pip install datasets)") from err
        name, split = parse_spec(spec)
        local = Path(name).expanduser()
        is_saved = local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file())
        try:
            if is_saved:
                name = os.path.abspath(local)
                loaded = datasets.load_from_disk(name)
            else:
                loaded = datasets.load_dataset(name, split=split) if split else datasets.load_dataset(name)
        except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError...)
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise TraitscopeError(f"cannot load Hugging Face dataset {name!r}: {first_line}") from err
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            if split is None and len(splits) == 1:
                split = splits[0]
            if split is None:
                raise TraitscopeError(f"{name} has splits {', '.join(splits)}; pick one, e.g. hf:{name}:{splits[0]}")
            if split not in loaded:
                raise TraitscopeError(f"{name} has no split {split!r} (splits: {', '.join(splits)})")
            dataset = loaded[split]
        elif isinstance(loaded, datasets.Dataset):
            dataset = loaded
            stored_split = str(dataset.split) if dataset.split is not None else None
            if split is not None and stored_split is not None and split != stored_split and is_saved:
                raise TraitscopeError(f"{name} holds only the {stored_split!r} split, not {split!r}")
            split = split or stored_split or "data"
        else:
            raise TraitscopeError(f"{name} loads as {type(loaded).__name__}; streaming datasets are not supported")

        features = dataset.features
        self.image_column = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
        if self.image_column is None:
            kinds = ", ".join(f"{c} ({type(f).__name__})" for c, f in features.items())
            raise TraitscopeError(f"{name} [{split}] has no Image column (columns: {kinds})")
        self.label_column, self._multi_label, names = _label_column(features, datasets)

        self.split = split
        self.root = Path(name)
        self.spec = f"{PREFIX}{name}:{split}"
        self.image_label_names = names
        self._dataset = dataset
        self._images = dataset.select_columns([self.image_column]).cast_column(self.image_column, datasets.Image(decode=False))
        self._label_values = None  # one Python list, read once (row indices of a shuffled/selected split respected)
        if self.label_column:
            table = dataset.select_columns([self.label_column]).with_format("arrow")[:]
            self._label_values = table[self.label_column].to_pylist()

    def records(self) -> list[dict]:
        labels = [None] * len(self._dataset)
        if self._label_values is not None and not self._multi_label:
            names = self.image_label_names
            labels = [names[v] if v is not None and 0 <= v < len(names) else None for v in self._label_values]
        return [{"index": i, "path": f"{self.split}/{i:08d}", "label": labels[i]} for i in range(len(self._dataset))]

    def load(self, record: dict) -> Image.Image:
        stored = self._images[int(record["index"])][self.image_column]
        if stored is None:
            raise ImageError("the dataset row has no image")
        if stored.get("bytes"):
            return load_image(io.BytesIO(stored["bytes"]))
        if stored.get("path"):
            return load_image(stored["path"])
        raise ImageError("the dataset row has neither image bytes nor a path")

    def image_labels(self, record: dict) -> np.ndarray | None:
        if self._label_values is None:
            return None
        row = np.zeros(len(self.image_label_names), dtype=np.uint8)
        value = self._label_values[int(record["index"])]
        for v in ((value or []) if self._multi_label else [value]):
            if v is not None and 0 <= v < len(row):  # -1 marks a missing label
                row[v] = 1
        return row

    def identity(self) -> dict:
        return {
            "kind": "hf",
            "root": str(self.root),
            "split": self.split,
            "fingerprint": self._dataset._fingerprint,
            "n_rows": len(self._dataset),
            "image_column": self.image_column,
            "label_column": self.label_column,
        }


def _label_column(features, datasets) -> tuple[str | None, bool, list[str]]:
    """(column, is_multi_label, class names) of the label column, or (None, False, [])."""
    single = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if single:
        column = next((c for c in single if c.lower() in ("label", "labels")), single[0])
        return column, False, list(features[column].names)
    for column, feature in features.items():
        inner = getattr(feature, "feature", None)
        if isinstance(feature, (list, tuple)) and feature:
            inner = feature[0]
        if isinstance(inner, datasets.ClassLabel):
            return column, True, list(inner.names)
    return None, False, []
