"""Every feature's activations over a data set, in one streaming pass through the SAE.

For each feature: how often it fires, its mean, a histogram of log10 activations, its top-N images by
maximum patch activation with the per-patch maps of those images, and (sparse) its maximum on every
image. The pass reads the activations image by image in chunks (all patches of an image together),
so per-image maxima and maps are exact, and keeps only running totals and the current top-N: memory
is bounded by d_sae x top_n x n_patches, whatever the number of images.

The result is `<run>/inference/<shards-hash>/` (see docs/formats.md). Its manifest names the SAE
weights (sha256), the shards and the settings; a rerun with the same inputs reuses it, and a folder
made from other weights, other shards or other settings is recomputed into a fresh folder that
replaces it whole.
"""

import queue
import shutil
import threading
from pathlib import Path

import numpy as np
import scipy.sparse
import torch
from tqdm import tqdm

from traitscope.errors import TraitscopeError
from traitscope.features.inputs import RunInputs, open_inputs
from traitscope.files import atomic_save_npy, atomic_write_json, folder_lock, read_json
from traitscope.runs import RunFolder
from traitscope.shards.store import NpyAppender
from traitscope.sae.sparse import one_thread

FORMAT = "traitscope-inference/1"
HIST_RANGE = (-5.0, 5.0)
"""log10 range of the activation histogram; values outside it are counted in the first / last bin."""
N_BINS = 100
"""Histogram bins (0.1 decade each)."""
CHUNK_TOKENS = 4096
"""Tokens encoded per step (whole images: at least one image)."""


RECOMPUTE = "rerun `traitscope inference` with the same --run and --shards to recompute it"
"""What to do about a damaged inference folder."""


def _open_npy(fpath: Path) -> np.ndarray:
    """A .npy file memory-mapped read-only, checked to be whole; TraitscopeError naming it otherwise."""
    try:
        arr = np.load(fpath, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError) as err:
        raise TraitscopeError(f"{fpath} is damaged ({' '.join(str(err).split())}); {RECOMPUTE}") from None
    if fpath.stat().st_size != arr.offset + arr.nbytes:
        raise TraitscopeError(f"{fpath} is damaged ({fpath.stat().st_size} bytes, expected "
                              f"{arr.offset + arr.nbytes}); {RECOMPUTE}")
    return arr


class Inference:
    """A finished inference folder, opened for reading (arrays are memory-mapped on first use)."""

    def __init__(self, dpath: str | Path):
        self.dpath = Path(dpath)
        manifest_fpath = self.dpath / "manifest.json"
        if not manifest_fpath.is_file():
            raise TraitscopeError(f"{self.dpath} is not a finished inference folder (no manifest.json); "
                                  "run `traitscope inference`")
        self.manifest = read_json(manifest_fpath, RECOMPUTE)
        if self.manifest.get("format") != FORMAT:
            raise TraitscopeError(f"{manifest_fpath}: format {self.manifest.get('format')!r}, expected {FORMAT}; "
                                  "rerun `traitscope inference` to recompute it")
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        """One of the folder's .npy files by stem, memory-mapped read-only."""
        if name not in self._arrays:
            fpath = self.dpath / f"{name}.npy"
            if not fpath.is_file():
                raise TraitscopeError(f"{self.dpath} has no {name}.npy")
            self._arrays[name] = _open_npy(fpath)
        return self._arrays[name]

    @property
    def d_sae(self) -> int:
        return int(self.manifest["d_sae"])

    @property
    def n_images(self) -> int:
        return int(self.manifest["n_images"])

    @property
    def grid(self) -> tuple[int, int]:
        rows, cols = self.manifest["grid"]
        return int(rows), int(cols)

    @property
    def top_rows(self) -> np.ndarray:
        return self.array("top_rows")

    @property
    def top_values(self) -> np.ndarray:
        return self.array("top_values")

    def top_images(self, feature: int) -> list[tuple[int, float]]:
        """(image row, max activation) of the feature's top images, best first (pads dropped)."""
        rows, values = self.top_rows[feature], self.top_values[feature]
        return [(int(r), float(v)) for r, v in zip(rows, values) if r >= 0]

    def patch_map(self, feature: int, slot: int) -> np.ndarray:
        """(grid rows, grid cols) float32 activation map of the feature's `slot`-th top image."""
        return np.asarray(self.array("top_patch_acts")[feature, slot], dtype=np.float32).reshape(self.grid)

    def image_max(self) -> scipy.sparse.csr_matrix:
        """(n_images, d_sae) CSR per-image feature maxima."""
        return scipy.sparse.csr_matrix(
            (self.array("image_max_data"), self.array("image_max_indices"), self.array("image_max_indptr")),
            shape=(self.n_images, self.d_sae))


def inference_dpath(run_dpath: str | Path, shards_hash: str) -> Path:
    return RunFolder(run_dpath).inference_dpath(shards_hash)


def _settings(inputs: RunInputs, top_n: int) -> dict:
    """What the folder's content depends on: a folder whose manifest differs here is recomputed."""
    return {"format": FORMAT, "sae_sha256": inputs.sae_sha256, "shards_hash": inputs.shards.hash,
            "layer": inputs.layer, "token_kind": inputs.token_kind, "top_n": top_n,
            "hist_range": list(HIST_RANGE), "n_bins": N_BINS}


def _stale_reason(manifest_fpath: Path, settings: dict) -> str | None:
    """None when the folder was made with exactly these settings, else why it is recomputed."""
    if not manifest_fpath.is_file():
        return "no finished result"
    try:
        old = read_json(manifest_fpath).get("settings", {})
        for fpath in manifest_fpath.parent.glob("*.npy"):
            _open_npy(fpath)
    except TraitscopeError as err:
        return str(err).split("; ")[0]
    names = {"format": "an older format", "sae_sha256": "different SAE weights",
             "shards_hash": "different shards", "top_n": "a different --top-n"}
    for key, value in settings.items():
        if old.get(key) != value:
            return f"made from {names.get(key, f'a different {key}')}"
    return None


def run_inference(run_dpath: str | Path, shards_dpath: str | Path, top_n: int = 16, device: str = "cpu",
                  chunk_tokens: int = CHUNK_TOKENS, progress: bool = True,
                  inputs: RunInputs | None = None) -> tuple[Inference, bool]:
    """Compute (or reuse) the inference folder of a run over a shard folder.

    Returns the opened folder and whether it was computed now (False: reused).
    """
    if top_n < 1:
        raise TraitscopeError(f"--top-n must be at least 1, got {top_n}")
    inputs = inputs or open_inputs(run_dpath, shards_dpath, device=device)
    dpath = inference_dpath(inputs.run_dpath, inputs.shards.hash)
    with folder_lock(dpath.parent, "traitscope inference", lock_name=f".{dpath.name}.lock"):
        return _run_inference(inputs, dpath, top_n, chunk_tokens, progress)


def _run_inference(inputs: RunInputs, dpath: Path, top_n: int, chunk_tokens: int,
                   progress: bool) -> tuple[Inference, bool]:
    settings = _settings(inputs, top_n)
    reason = _stale_reason(dpath / "manifest.json", settings)
    if reason is None:
        return Inference(dpath), False
    if dpath.exists() and progress:
        print(f"recomputing {dpath}: {reason}")
    work_dpath = dpath.with_name(dpath.name + ".partial")
    shutil.rmtree(work_dpath, ignore_errors=True)
    work_dpath.mkdir(parents=True)
    _compute(inputs, work_dpath, top_n, chunk_tokens, progress)
    manifest = {
        "format": FORMAT, "sae_sha256": inputs.sae_sha256,
        "shards": {"hash": inputs.shards.hash, "path": str(inputs.shards.dpath.resolve())},
        "run": str(inputs.run_dpath.resolve()), "layer": inputs.layer, "token_kind": inputs.token_kind,
        "n_images": inputs.n_images, "n_patches": inputs.tokens_per_image,
        "grid": list(inputs.shards.grid(inputs.layer)) if inputs.token_kind == "patches" else [1, 1],
        "top_n": top_n, "d_sae": inputs.sae.d_sae, "hist_range": list(HIST_RANGE), "n_bins": N_BINS,
        "settings": settings,
    }
    atomic_write_json(work_dpath / "manifest.json", manifest)
    shutil.rmtree(dpath, ignore_errors=True)  # an older result goes whole, never mixed with the new one
    work_dpath.rename(dpath)
    return Inference(dpath), True


def _raise_non_finite(inputs: RunInputs, first_row: int, acts_nd: np.ndarray) -> None:
    """Name the first token holding NaN/Inf (as `train` does); a sum that merely overflowed passes."""
    bad = np.flatnonzero(~np.isfinite(acts_nd).all(axis=1))
    if len(bad):
        image, token = divmod(int(bad[0]), inputs.tokens_per_image)
        where = f"image row {first_row + image}" + (f", patch {token}" if inputs.tokens_per_image > 1 else "")
        raise TraitscopeError(f"NaN/Inf in activations ({where}, layer {inputs.layer} {inputs.token_kind}) of "
                              f"{inputs.shards.dpath}; rebuild those shards (or drop that image); nothing was written")


def _chunks(inputs: RunInputs, chunk_tokens: int):
    """(first image row, (n_img * tokens_per_image, d_model) float array) in order, read one chunk ahead."""
    per_image = inputs.tokens_per_image
    images_per_chunk = max(1, chunk_tokens // per_image)
    starts = range(0, inputs.n_images, images_per_chunk)
    q: queue.Queue = queue.Queue(maxsize=2)

    def reader():
        for start in starts:
            stop = min(start + images_per_chunk, inputs.n_images)
            q.put((start, inputs.acts.read(start * per_image, stop * per_image)))
        q.put(None)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    while (item := q.get()) is not None:
        yield item
    thread.join()


class _TopN:
    """Running top-N images per feature by value, with each image's patch map.

    Ties go to the earlier image; an image whose value is 0 never enters (its slot stays -1 / 0).
    Maps live in a pool of d_sae x top_n rows that each feature owns top_n of; a merge only permutes
    the pool indices and writes the maps of the images that entered into the rows of those that left,
    so its cost follows the number of changes, not d_sae x top_n x n_patches.
    """

    def __init__(self, d_sae: int, top_n: int, n_patches: int | None, device: torch.device):
        self.top_n, self.d_sae, self.n_patches = top_n, d_sae, n_patches
        self.values = torch.zeros(d_sae, top_n, device=device)
        self.rows = torch.full((d_sae, top_n), -1, dtype=torch.int64, device=device)
        self.pool_idx = torch.arange(d_sae * top_n, device=device).view(d_sae, top_n)
        self.pool = torch.zeros(d_sae * top_n, n_patches, dtype=torch.float16, device=device) if n_patches else None

    def update(self, first_row: int, image_max_is: torch.Tensor, tok: torch.Tensor | None = None,
               feat: torch.Tensor | None = None, vals: torch.Tensor | None = None) -> None:
        """Merge a chunk of images `first_row`...: image_max_is (n_img, d_sae) their maxima; the
        chunk's non-zero codes as (token, feature, value) triplets (for the maps)."""
        n_img, top_n = image_max_is.shape[0], self.top_n
        # only features where some image of the chunk beats the current N-th value can change
        changed = (image_max_is.amax(0) > self.values[:, -1]).nonzero().squeeze(1)
        if changed.numel() == 0:
            return
        cand = torch.cat([self.values[changed], image_max_is[:, changed].T], dim=1)
        # stable sort of [current top (earlier rows), chunk (rows ascending)]: ties keep the earlier image
        values, order = torch.sort(cand, dim=1, descending=True, stable=True)
        values, order = values[:, :top_n], order[:, :top_n]
        is_new = order >= top_n
        old_slot = order.clamp(max=top_n - 1)
        chunk_rows = torch.arange(first_row, first_row + n_img, device=order.device)
        self.values[changed] = values
        self.rows[changed] = torch.where(is_new, chunk_rows[(order - top_n).clamp(min=0)],
                                         self.rows[changed].gather(1, old_slot))
        if self.pool is None:
            return
        # pool rows of the entries that left are reused for those that entered (same count per feature)
        pool_idx = self.pool_idx[changed]
        kept = torch.zeros(len(changed), top_n + 1, dtype=torch.bool, device=order.device)
        kept.scatter_(1, torch.where(is_new, top_n, order), True)
        freed = pool_idx[~kept[:, :top_n]]  # row-major: per feature, as many as it has new entries
        self.pool_idx[changed] = torch.where(is_new, 0, pool_idx.gather(1, old_slot))
        fi, si = is_new.nonzero(as_tuple=True)
        self.pool_idx[changed[fi], si] = freed
        # the entering maps, from the triplets: pair (image, feature) -> pool row
        n_p = self.n_patches
        target = torch.full((n_img * self.d_sae,), -1, dtype=torch.int64, device=order.device)
        target[(order[fi, si] - top_n) * self.d_sae + changed[fi]] = freed
        self.pool[freed] = 0
        dest = target[(tok // n_p) * self.d_sae + feat]
        hit = dest >= 0
        self.pool[dest[hit], tok[hit] % n_p] = vals[hit].to(torch.float16)

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        empty = self.values <= 0
        self.rows[empty] = -1
        self.values[empty] = 0
        maps = None
        if self.pool is not None:
            maps = self.pool[self.pool_idx]
            maps[empty] = 0
            maps = maps.cpu().numpy()
        return self.rows.cpu().numpy(), self.values.cpu().numpy(), maps


class _Totals:
    """Everything but the top-N, accumulated over chunks from the non-zero codes."""

    def __init__(self, d_sae: int, n_images: int, out_dpath: Path, device: torch.device):
        self.d_sae = d_sae
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.image_fire_count = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.hist = torch.zeros(d_sae * N_BINS, dtype=torch.int64, device=device)
        self.row_nnz = np.zeros(n_images, dtype=np.int64)
        self.indices_out = NpyAppender(out_dpath / "image_max_indices.npy", np.int32, ())
        self.data_out = NpyAppender(out_dpath / "image_max_data.npy", np.float32, ())

    def add(self, first_row: int, n_img: int, n_p: int, tok: torch.Tensor, feat: torch.Tensor,
            vals: torch.Tensor) -> torch.Tensor:
        """Add a chunk's non-zero codes (token within the chunk, feature, value > 0); returns the
        chunk's (n_img, d_sae) per-image maxima."""
        lo, hi = HIST_RANGE
        self.fire_count.index_add_(0, feat, torch.ones_like(feat))
        self.act_sum.index_add_(0, feat, vals.double())
        bins = ((torch.log10(vals) - lo) * (N_BINS / (hi - lo))).floor_().clamp_(0, N_BINS - 1).long()
        self.hist.index_add_(0, feat * N_BINS + bins, torch.ones_like(bins))
        image_max_is = torch.zeros(n_img * self.d_sae, device=vals.device).scatter_reduce_(
            0, (tok // n_p) * self.d_sae + feat, vals, reduce="amax").view(n_img, self.d_sae)
        img_i, feat_i = image_max_is.nonzero(as_tuple=True)
        self.image_fire_count.index_add_(0, feat_i, torch.ones_like(feat_i))
        self.indices_out.append(feat_i.to(torch.int32).cpu().numpy())
        self.data_out.append(image_max_is[img_i, feat_i].cpu().numpy())
        self.row_nnz[first_row:first_row + n_img] = torch.bincount(img_i, minlength=n_img).cpu().numpy()
        return image_max_is

    def close(self) -> None:
        self.indices_out.close()
        self.data_out.close()

    def abort(self) -> None:
        self.indices_out.abort()
        self.data_out.abort()

    def save(self, out_dpath: Path, n_tokens: int, n_images: int) -> None:
        arrays = {
            "feature_freq": (self.fire_count.double() / max(1, n_tokens)).float(),
            "feature_image_freq": (self.image_fire_count.double() / max(1, n_images)).float(),
            "feature_mean": (self.act_sum / max(1, n_tokens)).float(),
            "feature_hist": self.hist.view(self.d_sae, N_BINS),
            "hist_edges": torch.linspace(*HIST_RANGE, N_BINS + 1, dtype=torch.float64),
        }
        for name, tensor in arrays.items():
            atomic_save_npy(out_dpath / f"{name}.npy", tensor.cpu().numpy())
        atomic_save_npy(out_dpath / "image_max_indptr.npy", np.concatenate([[0], np.cumsum(self.row_nnz)]))


@torch.no_grad()
def _compute(inputs: RunInputs, out_dpath: Path, top_n: int, chunk_tokens: int, progress: bool) -> None:
    """The streaming pass: encode a chunk of whole images, then update totals and top-N from its
    non-zero codes."""
    sae, n_images, n_p = inputs.sae, inputs.n_images, inputs.tokens_per_image
    device = sae.W_enc.device
    is_cls = inputs.token_kind == "cls"
    totals = _Totals(sae.d_sae, n_images, out_dpath, device)
    top = _TopN(sae.d_sae, top_n, None if is_cls else n_p, device)
    cls_out = NpyAppender(out_dpath / "cls_codes.npy", np.float32, (sae.d_sae,)) if is_cls else None
    bar = tqdm(total=n_images, unit="img", desc="inference", disable=not progress)
    n_tokens = 0
    try:
        for first_row, acts_np in _chunks(inputs, chunk_tokens):
            n_img = acts_np.shape[0] // n_p
            x_bd = torch.from_numpy(acts_np).to(device=device, dtype=torch.float32)
            if not torch.isfinite(x_bd.sum()):  # after torch's cast: numpy's float16 sum took 0.74 µs per token
                _raise_non_finite(inputs, first_row, acts_np)
            tok, feat, vals = sae.encode_sparse(x_bd)  # a feature fires where its code is positive
            valid = inputs.valid_tokens(first_row, first_row + n_img)
            if valid is not None:  # padding patches: never counted, ranked or drawn
                keep = torch.from_numpy(valid).to(device)[tok]
                tok, feat, vals = tok[keep], feat[keep], vals[keep]
                n_tokens += int(valid.sum())
            else:
                n_tokens += len(x_bd)
            if cls_out is not None:
                codes_bs = torch.zeros(len(x_bd), sae.d_sae, device=device).index_put_((tok, feat), vals)
                cls_out.append(codes_bs.cpu().numpy())
            with one_thread(device):
                image_max_is = totals.add(first_row, n_img, n_p, tok, feat, vals)
                top.update(first_row, image_max_is, tok, feat, vals)
            bar.update(n_img)
        totals.close()
        if cls_out is not None:
            cls_out.close()
    except BaseException:
        totals.abort()
        if cls_out is not None:
            cls_out.abort()
        raise
    finally:
        bar.close()
    totals.save(out_dpath, n_tokens, n_images)
    rows, values, maps = top.finish()
    atomic_save_npy(out_dpath / "top_rows.npy", rows)
    atomic_save_npy(out_dpath / "top_values.npy", values)
    if maps is not None:
        atomic_save_npy(out_dpath / "top_patch_acts.npy", maps)
