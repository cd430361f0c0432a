"""What the app reads, without Streamlit: datasets (shard folders), SAE runs, inference outputs, labels.

Everything is opened read-only and memory-mapped (`np.load(mmap_mode='r', allow_pickle=False)`), so a
feature page of a 100k-image dataset reads a few kilobytes. Files come only from the folders named
on the command line; an image is opened only when its resolved path lies under the dataset's
`images_root` (see `safe_child`), whatever the image index or a query parameter says.
Derived tables the formats do not store (dense-dimension top images, label co-occurrence) are computed
once in a bounded pass and cached as .npy under a cache folder, keyed by what they depend on.
"""

import os
import re
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import scipy.sparse
from PIL import Image

from traitscope import runs
from traitscope.backbones.base import Preprocess
from traitscope.errors import TraitscopeError
from traitscope.features import Inference
from traitscope.features.enrichment import bh_q, enrichment_test, lift
from traitscope.features.ranking import grid_ranking, rank_top_images, row_batches
from traitscope.files import atomic_save_npy, read_json
from traitscope.images import ImageError, decode_image, load_image, open_source
from traitscope.sae import describe_params
from traitscope.shards.store import Shards, content_hash


Progress = Callable[[float, str], None]
"""progress(fraction_done, message): how long computations report where they are."""


def _no_progress(fraction: float, message: str) -> None:
    pass


def safe_child(root: Path, rel: str | os.PathLike) -> Path:
    """`root / rel` for a relative path `rel` from the data, refused (TraitscopeError) when it is
    absolute or climbs out with '..'. Links inside `root` are followed like `shards` followed them,
    so a data set whose images are links into another folder is viewable."""
    rel_path = Path(rel)
    if rel_path.is_absolute() or ".." in rel_path.parts or not rel_path.parts:
        raise TraitscopeError(f"refusing {str(rel)!r}: image paths must lie under {root}")
    return Path(root).resolve() / rel_path


def load_npy(fpath: Path, mmap: bool = True) -> np.ndarray:
    """A .npy file, memory-mapped by default, never unpickled; a damaged file is a TraitscopeError naming it."""
    try:
        return np.load(fpath, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError) as err:
        raise TraitscopeError(f"{fpath} cannot be read ({' '.join(str(err).split())})") from None


def open_image_file(fpath_or_file) -> Image.Image:
    """Decode an image (a path or a file-like object) to upright RGB, as the shards saw it, with the
    checks of `load_image`: only a regular file, bounded in bytes, and in pixels before decoding."""
    return load_image(fpath_or_file)


def open_thumbnail_file(fpath: Path, min_side: int) -> Image.Image:
    """Like `open_image_file`, a JPEG decoded at the smallest DCT scale whose shorter side is >= min_side
    (`traitscope.images.decode_image`), cut to the part that holds the picture."""
    def min_size(width: int, height: int) -> tuple[int, int]:
        scale = min(1.0, min_side / max(1, min(width, height)))
        return int(np.ceil(width * scale)), int(np.ceil(height * scale))

    try:
        decoded = decode_image(fpath, min_size)
    except ImageError as err:
        raise TraitscopeError(f"{fpath.name}: {err}") from None
    if decoded.box is None:
        return decoded.image
    return decoded.image.crop(tuple(int(round(v)) for v in decoded.box))


def parse_int(value, lo: int, hi: int) -> int | None:
    """An integer in [lo, hi) from untrusted input (query parameter, form), or None."""
    try:
        text = str(value).strip()
        if not re.fullmatch(r"-?\d{1,12}", text):
            return None
        number = int(text)
    except (TypeError, ValueError):
        return None
    return number if lo <= number < hi else None


# ---------------------------------------------------------------------------------------------
# Datasets


class Dataset:
    """A shard folder as the app sees it: images (under a checked root), preprocessing, labels."""

    def __init__(self, dpath: str | Path, images_root: str | Path | None = None):
        """`images_root`: where the images lie, when the shards do not record it (saev shards) or it moved."""
        self.shards = Shards(dpath)
        if images_root is not None:
            self.shards.use_images_root(images_root)
        self.dpath = self.shards.dpath.resolve()
        self.manifest = self.shards.manifest
        self.root = Path(self.manifest["images_root"]).resolve()
        if not self.manifest.get("preprocess"):  # saev shards of a family whose transform saev does not record
            raise TraitscopeError(f"{self.dpath}: the app draws features over the images, which needs the model's "
                                  "image preprocessing, and these shards do not record it; train, import, "
                                  "inference and align work on them")
        self.preprocess = Preprocess.from_dict(self.manifest["preprocess"])
        self.images = self.shards.images
        self.images_unknown = self.shards.images_unknown()
        """Why the image files are unknown (saev shards without --images-root), or None."""
        self._labels: tuple[list[str], scipy.sparse.csr_matrix] | None = None
        self._source = None

    @property
    def hash(self) -> str:
        return self.shards.hash

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def model_name(self) -> str:
        return self.manifest["model"]["name"]

    def title(self) -> str:
        return f"{self.hash} · {self.model_name} · {self.n_images} images"

    def image_fpath(self, row: int) -> Path:
        """The file behind image `row`, checked to lie under `images_root`."""
        row = int(row)
        if not 0 <= row < self.n_images:
            raise TraitscopeError(f"image row {row} is out of range (0..{self.n_images - 1})")
        if self.images_unknown:
            raise TraitscopeError(self.images_unknown)
        return safe_child(self.root, self.images[row]["path"])

    @property
    def from_dataset_hub(self) -> bool:
        """Images come from a Hugging Face dataset (named in the manifest), not from files."""
        return str(self.manifest.get("source", {}).get("spec", "")).startswith("hf:")

    def open_image(self, row: int, min_side: int | None = None) -> Image.Image:
        """Image `row` as upright RGB: a file under `images_root`, or a record of the manifest's dataset.

        With `min_side`, a JPEG is decoded at a reduced scale (1/2, 1/4 or 1/8, Pillow's `draft`) that
        keeps its shorter side at least `min_side` pixels: thumbnails of large photos decode many times
        faster, and the aspect ratio (hence where the model's crop box falls) is kept.
        """
        fpath = self.image_fpath(row)
        if self.from_dataset_hub and not fpath.is_file():
            if self._source is None:
                self._source = open_source(self.manifest["source"]["spec"])
            return self._source.load(self.images[row])
        if min_side is None:
            return open_image_file(fpath)
        return open_thumbnail_file(fpath, min_side)

    def grid(self, layer: int) -> tuple[int, int]:
        return self.shards.grid(layer)

    def labels(self) -> tuple[list[str], scipy.sparse.csr_matrix]:
        """Image-level labels: names and an (n_images, n_labels) 0/1 CSR matrix.

        Gathered from the three places shards keep labels: per-image multi-hot labels, the `label`
        string of each image record (one name per distinct value), and per-patch labels (an image has
        a patch label when any of its patches has it).
        """
        if self._labels is None:
            names: list[str] = []
            blocks: list[scipy.sparse.csr_matrix] = []
            image_labels = self.shards.image_labels()
            if image_labels is not None:
                names += self.shards.image_label_names
                blocks.append(scipy.sparse.csr_matrix(image_labels.astype(bool)))
            values = [rec.get("label") for rec in self.images]
            distinct = sorted({str(v) for v in values if v not in (None, "")} - set(names))
            if distinct:
                col_of = {name: j for j, name in enumerate(distinct)}
                rows = [i for i, v in enumerate(values) if v not in (None, "") and str(v) in col_of]
                cols = [col_of[str(values[i])] for i in rows]
                blocks.append(scipy.sparse.csr_matrix(
                    (np.ones(len(rows), dtype=bool), (rows, cols)), shape=(self.n_images, len(distinct))))
                names += distinct
            patch_names = [n for n in self.shards.patch_label_names if n not in names]
            if patch_names:
                keep = [j for j, n in enumerate(self.shards.patch_label_names) if n in patch_names]
                blocks.append(scipy.sparse.csr_matrix(self._any_patch_labels()[:, keep]))
                names += patch_names
            matrix = (scipy.sparse.hstack(blocks, format="csr").astype(bool) if blocks
                      else scipy.sparse.csr_matrix((self.n_images, 0), dtype=bool))
            self._labels = (names, matrix)
        return self._labels

    def _any_patch_labels(self, chunk_images: int = 4096) -> np.ndarray:
        labels = self.shards.patch_labels()
        n_patches = labels.rows_per_item
        out = np.zeros((self.n_images, labels.width), dtype=bool)
        for start in range(0, self.n_images, chunk_images):
            stop = min(start + chunk_images, self.n_images)
            block = labels.read(start * n_patches, stop * n_patches).reshape(stop - start, n_patches, -1)
            out[start:stop] = block.any(axis=1)
        return out

    def image_label_names(self, row: int) -> list[str]:
        names, matrix = self.labels()
        return [names[j] for j in matrix.indices[matrix.indptr[row]:matrix.indptr[row + 1]]]


# ---------------------------------------------------------------------------------------------
# Runs and their inference outputs


class Run(runs.RunFolder):
    """An SAE run folder as the app shows it (the folder itself: `traitscope.runs`)."""

    def __init__(self, dpath: Path, name: str):
        super().__init__(Path(dpath).resolve(), name)
        _ = self.config, self.metrics  # read now: a damaged folder is refused here, not on a page

    @property
    def layer(self) -> int | None:
        return self.shards.layer

    @property
    def token_kind(self) -> str:
        return self.shards.token_kind

    @property
    def imported_from(self) -> str | None:
        """The library an imported SAE was trained with (saev, saelens, sparsify), or None."""
        imported = self.config.get("train", {}).get("imported")
        return str(imported.get("format", "another library")) if isinstance(imported, dict) else None

    def title(self, shards_hash: str | None = None) -> str:
        """Name, SAE and its held-out metrics: on the dataset `shards_hash` when its inference has them,
        else from metrics.json (held out from the shards it was trained on, or imported onto)."""
        sae = self.sae_config
        parts = [self.name, str(sae.get("variant", "?")), f"d_sae={sae.get('d_sae', '?')}"]
        setting = describe_params(sae)
        if setting:
            parts.append(setting)
        if self.imported_from:
            parts.append(f"imported from {self.imported_from}")
        heldout = (self.heldout_rows(shards_hash) or {}).get("sae") if shards_hash else None
        metrics, where = (heldout, "held out on this dataset") if heldout else (self.metrics, (
            "held out on the shards it was imported onto" if self.imported_from else "held out on its training data"))
        values = [f"{key}={metrics[key]:.3g}" for key in ("l0", "nmse") if isinstance(metrics.get(key), (int, float))]
        if values:
            parts.append(" ".join(values) + f" {where}")
        return " · ".join(parts)

    def heldout_rows(self, shards_hash: str) -> dict[str, dict] | None:
        """Held-out metrics on a dataset (`traitscope inference`'s metrics.json): method -> metric -> value."""
        fpath = self.inference_dpath(shards_hash) / "metrics.json"
        try:
            rows = read_json(fpath)["rows"] if fpath.is_file() else None
        except (TraitscopeError, KeyError, TypeError):
            return None
        return rows if isinstance(rows, dict) else None

    def can_encode(self, dataset: Dataset) -> bool:
        """Whether this SAE reads the dataset's activations (same layer, token kind and width)."""
        layer = self.layer
        if layer is None or not self.has_weights:
            return False
        try:
            return (self.token_kind in dataset.shards.token_kinds
                    and dataset.shards.d_model(layer) == self.sae_config.get("d_model"))
        except TraitscopeError:
            return False


def find_run_folders(runs_dpath: str | Path) -> tuple[list[Run], list[tuple[str, str]]]:
    """(the usable runs at or under `runs_dpath`, (name, why) for each run folder that cannot be used), as
    `traitscope.runs.find_runs` finds them."""
    found = runs.find_runs(runs_dpath)
    usable, unusable = [], list(found.unusable)
    for run in found.runs:
        try:
            usable.append(Run(run.dpath, run.name))
        except TraitscopeError as err:
            unusable.append((run.name, str(err)))
    return usable, sorted(unusable)


class FeatureData(NamedTuple):
    """Everything a feature page shows about one SAE feature."""

    index: int
    freq: float
    """Fraction of patch tokens where it fires."""
    image_freq: float
    """Fraction of images where it fires on any patch."""
    mean: float
    """Mean activation over all patch tokens."""
    hist_counts: np.ndarray
    """(n_bins,) counts of log10 of its non-zero activations."""
    hist_edges: np.ndarray
    """(n_bins + 1,) log10 bin edges."""
    rows: np.ndarray
    """(n,) image rows of its top images, best first (padding removed)."""
    values: np.ndarray
    """(n,) max activation over patches in each of those images."""
    maps_nhw: np.ndarray
    """(n, grid_rows, grid_cols) float32 per-patch activations in each top image ((n, 1, 1) for cls SAEs)."""

    @property
    def has_patch_maps(self) -> bool:
        return self.maps_nhw.shape[1] * self.maps_nhw.shape[2] > 1


class InferenceView(Inference):
    """An inference folder (`traitscope.features.Inference`) with what a feature page reads.

    Shapes are checked against the manifest once, so a page never indexes past an array.
    """

    def __init__(self, dpath: str | Path):
        super().__init__(Path(dpath).resolve())
        self.top_n = int(self.manifest["top_n"])
        self.freq = self.array("feature_freq")
        self.image_freq = self.array("feature_image_freq")
        self.mean = self.array("feature_mean")
        self.hist = self.array("feature_hist")
        self.hist_edges = np.asarray(self.array("hist_edges"), dtype=np.float64)
        maps_fpath = self.dpath / "top_patch_acts.npy"
        self.top_patch_acts = self.array("top_patch_acts") if maps_fpath.is_file() else None
        self.im_indptr = self.array("image_max_indptr")
        self.im_indices = self.array("image_max_indices")
        self.im_data = self.array("image_max_data")
        self._check_shapes()

    def _check_shapes(self) -> None:
        s, n, p = self.d_sae, self.top_n, self.grid[0] * self.grid[1]
        top_rows, top_values = self.top_rows, self.top_values
        expected = {"feature_freq": (self.freq.shape, (s,)), "feature_image_freq": (self.image_freq.shape, (s,)),
                    "feature_mean": (self.mean.shape, (s,)), "top_rows": (top_rows.shape, (s, n)),
                    "top_values": (top_values.shape, (s, n)),
                    "image_max_indptr": (self.im_indptr.shape, (self.n_images + 1,))}
        if self.top_patch_acts is not None:
            expected["top_patch_acts"] = (self.top_patch_acts.shape, (s, n, p))
        for name, (got, want) in expected.items():
            if tuple(got) != want:
                raise TraitscopeError(f"{self.dpath}/{name}.npy has shape {tuple(got)}, expected {want}")
        if self.hist.ndim != 2 or self.hist.shape[0] != s or self.hist_edges.shape != (self.hist.shape[1] + 1,):
            raise TraitscopeError(f"{self.dpath}: feature_hist.npy / hist_edges.npy shapes disagree")

    @property
    def shards_hash(self) -> str:
        return self.manifest["shards"]["hash"]

    def feature(self, f: int) -> FeatureData:
        f = int(f)
        if not 0 <= f < self.d_sae:
            raise TraitscopeError(f"feature {f} is out of range (0..{self.d_sae - 1})")
        rows = np.asarray(self.top_rows[f])
        keep = rows >= 0
        if self.top_patch_acts is not None:
            maps = np.asarray(self.top_patch_acts[f][keep], dtype=np.float32).reshape(-1, *self.grid)
        else:  # image-level SAE: one value per image
            maps = np.asarray(self.top_values[f][keep], dtype=np.float32).reshape(-1, 1, 1)
        return FeatureData(f, float(self.freq[f]), float(self.image_freq[f]), float(self.mean[f]),
                           np.asarray(self.hist[f]), self.hist_edges, rows[keep],
                           np.asarray(self.top_values[f][keep], dtype=np.float32), maps)

    def image_features(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(features, max activations) of the features firing in image `row`, strongest first."""
        row = int(row)
        if not 0 <= row < self.n_images:
            raise TraitscopeError(f"image row {row} is out of range")
        lo, hi = int(self.im_indptr[row]), int(self.im_indptr[row + 1])
        features, values = np.asarray(self.im_indices[lo:hi]), np.asarray(self.im_data[lo:hi], dtype=np.float32)
        order = np.argsort(-values, kind="stable")
        return features[order].astype(np.int64), values[order]

    def fire_counts(self) -> np.ndarray:
        """(d_sae,) number of images where each feature fires."""
        return np.rint(np.asarray(self.image_freq, dtype=np.float64) * self.n_images).astype(np.int64)

    def features_by_frequency(self, lo: float = 0.0, hi: float = 1.0, descending: bool = True) -> np.ndarray:
        """Features whose image frequency lies in [lo, hi], most (or least) frequent first."""
        freq = np.asarray(self.image_freq)
        candidates = np.flatnonzero((freq >= lo) & (freq <= hi))
        order = np.argsort(-freq[candidates] if descending else freq[candidates], kind="stable")
        return candidates[order]

    def image_max_block(self, start: int, stop: int) -> scipy.sparse.csr_matrix:
        """Rows [start, stop) of the per-image maxima as a CSR matrix (read from the memory maps)."""
        lo, hi = int(self.im_indptr[start]), int(self.im_indptr[stop])
        indptr = np.asarray(self.im_indptr[start:stop + 1], dtype=np.int64) - lo
        return scipy.sparse.csr_matrix(
            (np.asarray(self.im_data[lo:hi], dtype=np.float32), np.asarray(self.im_indices[lo:hi]), indptr),
            shape=(stop - start, self.d_sae))


# ---------------------------------------------------------------------------------------------
# Derived tables, cached as .npy


def _cache_dpath(cache_root: Path, key: dict) -> Path:
    dpath = Path(cache_root) / content_hash(key)
    dpath.mkdir(parents=True, exist_ok=True)
    return dpath


MIN_SUPPORT = 3
"""A label counts as enriched in a feature only when it is on at least this many of its firing images."""


class LabelTests(NamedTuple):
    """One-sided hypergeometric tests of (feature, label) pairs: is the label over-represented among the
    images where the feature fires? Sorted by feature, then label."""

    min_support: int
    """Pairs seen on fewer firing images were not tested."""
    names: list[str]
    """Label names."""
    label_counts: np.ndarray
    """(n_labels,) images with each label."""
    features: np.ndarray
    labels: np.ndarray
    counts: np.ndarray
    """Images where the feature fires and the label is present."""
    fire: np.ndarray
    """Images where the feature fires."""
    lift: np.ndarray
    """Share of labelled images among the firing ones / share among all images."""
    p: np.ndarray
    """Hypergeometric p-value of at least `counts` by chance."""
    q: np.ndarray
    """Benjamini-Hochberg q-value over every tested pair."""

    def best(self, d_sae: int) -> dict[str, np.ndarray]:
        """Per feature, its most significant label: label (-1: none tested), count, lift, p, q (1 when none)."""
        order = np.lexsort((-self.lift, self.p, self.features))
        first = order[np.unique(self.features[order], return_index=True)[1]]
        out = {"label": np.full(d_sae, -1, np.int64), "count": np.zeros(d_sae, np.int64),
               "lift": np.zeros(d_sae), "p": np.ones(d_sae), "q": np.ones(d_sae)}
        f = self.features[first]
        out["label"][f], out["count"][f], out["lift"][f] = self.labels[first], self.counts[first], self.lift[first]
        out["p"][f], out["q"][f] = self.p[first], self.q[first]
        return out

    def for_feature(self, f: int, top: int = 10) -> list[dict]:
        """The labels most significantly enriched among the images where feature f fires (lowest p,
        then highest lift)."""
        lo, hi = np.searchsorted(self.features, [f, f + 1])
        order = lo + np.lexsort((-self.lift[lo:hi], self.p[lo:hi]))[:top]
        return [{"label": self.names[j], "images": int(c), "precision": float(c / max(1, n)),
                 "recall": float(c / max(1, self.label_counts[j])), "lift": float(li), "p": float(pv),
                 "q": float(qv)}
                for j, c, n, li, pv, qv in zip(self.labels[order], self.counts[order], self.fire[order],
                                               self.lift[order], self.p[order], self.q[order])]


class LabelCooccurrence(NamedTuple):
    """Image-level co-occurrence of features and labels: label enrichment over each feature's firing
    images (every image where it fires), and label search."""

    names: list[str]
    """Label names."""
    n_images: int
    label_counts: np.ndarray
    """(n_labels,) images with each label."""
    fire_counts: np.ndarray
    """(d_sae,) images where each feature fires."""
    both_fl: scipy.sparse.csr_matrix
    """(d_sae, n_labels) images where the feature fires and the label is present."""
    both_lf: scipy.sparse.csr_matrix
    """The same, transposed (fast per-label columns)."""

    def table(self, counts: np.ndarray, labels: np.ndarray, fire: np.ndarray) -> dict[str, np.ndarray]:
        lift_ = lift(counts, fire, self.label_counts[labels], max(1, self.n_images))
        return {"count": counts, "precision": counts / np.maximum(fire, 1),
                "recall": counts / np.maximum(self.label_counts[labels], 1),
                "lift": np.nan_to_num(lift_, nan=0.0, posinf=0.0)}

    def tests(self, min_support: int = MIN_SUPPORT, p_fpath: Path | None = None) -> "LabelTests":
        """Enrichment test (`features.enrichment.enrichment_test`, over the firing images) of every
        (feature, label) pair seen on >= min_support images, with Benjamini-Hochberg q-values over all
        those tests together. `p_fpath`: a .npy file keeping the p-values (the slow part: minutes for
        a 16k-feature dictionary on 100k images) for the next server start."""
        coo = self.both_fl.tocoo()
        keep = coo.data >= min_support
        features, labels, counts = coo.row[keep], coo.col[keep], coo.data[keep].astype(np.int64)
        order = np.lexsort((labels, features))
        features, labels, counts = features[order].astype(np.int64), labels[order].astype(np.int64), counts[order]
        fire = self.fire_counts[features]
        p = load_npy(p_fpath, mmap=False) if p_fpath is not None and p_fpath.is_file() else None
        if p is None or p.shape != counts.shape:
            p = enrichment_test(counts, fire, self.label_counts[labels], self.n_images).p
            if p_fpath is not None:
                atomic_save_npy(p_fpath, p)
        lift_ = self.table(counts, labels, fire)["lift"]
        return LabelTests(min_support, self.names, self.label_counts, features, labels, counts, fire, lift_, p, bh_q(p))

    def features_for_label(self, label: int, min_count: int = 3, top: int = 200) -> tuple[np.ndarray, np.ndarray]:
        """(features, lift) most enriched for a label, among those firing on >= min_count labelled images."""
        col = self.both_lf.getrow(label)
        features, counts = col.indices, col.data.astype(np.int64)
        keep = counts >= min_count
        features, counts = features[keep], counts[keep]
        t = self.table(counts, np.full(len(features), label), self.fire_counts[features])
        order = np.lexsort((-t["count"], -t["lift"]))[:top]
        return features[order].astype(np.int64), t["lift"][order]

    def search(self, text: str) -> list[int]:
        """Labels whose name contains `text` (case-insensitive)."""
        text = text.strip().lower()
        return [j for j, name in enumerate(self.names) if text in name.lower()]


def label_cooccurrence(inference: InferenceView, dataset: Dataset, cache_root: Path,
                       chunk_images: int = 16384, progress: Progress = _no_progress) -> LabelCooccurrence:
    """Co-occurrence counts of firing features and labels: one bounded pass over the CSR, cached."""
    names, labels = dataset.labels()
    if inference.n_images != dataset.n_images:
        raise TraitscopeError(f"inference {inference.dpath} has {inference.n_images} images, "
                              f"dataset {dataset.dpath} has {dataset.n_images}")
    key = {"what": "label-cooccurrence/1", "inference": str(inference.dpath),
           "sae": inference.manifest.get("sae_sha256"), "shards": dataset.hash, "labels": names}
    dpath = _cache_dpath(cache_root, key)
    parts = {name: dpath / f"{name}.npy" for name in ("data", "indices", "indptr")}
    label_counts = np.asarray(labels.sum(axis=0)).ravel().astype(np.int64)
    if all(p.is_file() for p in parts.values()):
        both = scipy.sparse.csr_matrix(
            (load_npy(parts["data"], mmap=False), load_npy(parts["indices"], mmap=False),
             load_npy(parts["indptr"], mmap=False)), shape=(inference.d_sae, len(names)))
    else:
        both = scipy.sparse.csr_matrix((inference.d_sae, len(names)), dtype=np.int64)
        labels_i = labels.astype(np.int64)
        for start in range(0, inference.n_images, chunk_images):
            stop = min(start + chunk_images, inference.n_images)
            fires = inference.image_max_block(start, stop)
            fires.data = (fires.data > 0).astype(np.int64)
            both = both + (fires.T @ labels_i[start:stop]).tocsr()
            progress(stop / inference.n_images, f"label co-occurrence: {stop}/{inference.n_images} images")
        both = both.tocsr()
        both.sort_indices()
        for name, array in (("data", both.data), ("indices", both.indices), ("indptr", both.indptr)):
            atomic_save_npy(parts[name], array)
    return LabelCooccurrence(names, inference.n_images, label_counts, inference.fire_counts(), both, both.T.tocsr())


def dense_top_images(dataset: Dataset, layer: int, kind: str, top_n: int, cache_root: Path,
                     chunk_images: int = 256, progress: Progress = _no_progress) -> np.ndarray:
    """(d_model, top_n) image rows where each raw dimension is largest, best first (the dense baseline).

    Ranked as the same run's SAE features are in the blind test (`features.ranking.grid_ranking`): an
    image-level embedding (`kind='cls'`) by "normalised", as in the faces experiment and `traitscope
    grids`; a patch-level one by "max", each image's largest value over its patches.
    One bounded pass over the shard (a running top-n, `chunk_images` images at a time), cached.
    """
    shards = dataset.shards
    layer = shards.resolve(layer)
    by = grid_ranking(kind)
    key = {"what": "dense-top/2", "shards": dataset.hash, "layer": layer, "kind": kind, "top_n": top_n,
           "normalize": by == "normalised"}
    rows_fpath = _cache_dpath(cache_root, key) / "dense_top_rows.npy"
    if rows_fpath.is_file():
        return load_npy(rows_fpath, mmap=False)
    acts = shards.acts(layer, kind)
    per_image, n = acts.rows_per_item, dataset.n_images
    validity = shards.patch_validity(layer) if kind == "patches" else None

    def batches():
        for start in range(0, n, chunk_images):
            stop = min(start + chunk_images, n)
            block = acts.read(start * per_image, stop * per_image).astype(np.float32)
            block = block.reshape(stop - start, per_image, acts.width)
            if validity is not None:  # padding patches never rank an image
                block[~validity.of_images(start, stop)] = -np.inf
            yield start, block.max(axis=1)
            progress(stop / n, f"dense dimensions: {stop}/{n} images")

    rows = rank_top_images(batches(), top_n, by, kind="dense").rows_un
    atomic_save_npy(rows_fpath, rows)
    return rows


def sae_top_rows(dataset: Dataset, run: Run, inference: Inference, top_n: int, cache_root: Path) -> np.ndarray:
    """(d_sae, top_n) image rows of each SAE feature's top images, best first (-1: fewer firing images).

    Ranked by `features.ranking.grid_ranking`: patch-level runs by "max" (inference's ranking, read as
    stored); image-level runs by "normalised" (as `traitscope grids` and the faces experiment), one pass
    over inference's codes (`cls_codes`), cached by the SAE's weights.
    """
    if grid_ranking(run.token_kind) == "max":
        return np.asarray(inference.top_rows[:, :top_n])
    key = {"what": "sae-top/2", "shards": dataset.hash, "sae": inference.manifest.get("sae_sha256"),
           "layer": run.layer, "top_n": top_n}
    rows_fpath = _cache_dpath(cache_root, key) / "sae_top_rows.npy"
    if rows_fpath.is_file():
        return load_npy(rows_fpath, mmap=False)
    rows = rank_top_images(row_batches(inference.array("cls_codes"), 4096), top_n, "normalised", positive_only=True,
                           kind="sae").rows_un
    atomic_save_npy(rows_fpath, rows)
    return rows
