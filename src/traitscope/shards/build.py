"""Run a backbone over an image source and write a content-addressed shard folder.

Four stages overlap, so the model is never left waiting on the disk or the JPEG decoder:

    decode + preprocess (worker processes or threads)  ->  collate batches (thread)
    ->  model forward (this thread)  ->  write to disk (thread)

Decoding is one function (`DecodeJob`) whichever workers run it. `decode="draft"` lets the JPEG
decoder work at 1/2, 1/4 or 1/8 scale, never below the size the backbone's `Preprocess.resized_size`
asks for; the folder's manifest says so (`decode`), and it is part of the folder's identity, so a
folder decoded in full is never mixed with a drafted one. `decode="full"` gives the same bytes as
before this option existed. `decode="device"` has the workers only read JPEG files (and check their
headers) and decodes them in batches where the model runs (`torchvision.io.decode_jpeg`: nvJPEG on
a CUDA GPU), resized by `Preprocess.crop_tensor` (torch's antialiased resampling: the pixels differ
slightly from PIL's); other files are decoded by the workers as usual.

Shard s covers listed images [s * S, (s + 1) * S), S = images_per_shard; skipped images get no rows.
A shard's rows stream into `.tmp` files as they are computed (memory stays flat however many images
there are); the files are renamed into place when the shard ends, and only then is its progress
record written. A rerun skips shards with a record and recomputes the others with the same batches,
so a run killed part-way and rerun ends with the same bytes as one that was never interrupted.

Under `torchrun` (a process group joined with `traitscope.dist.session`) every rank runs the same
`build_shards` call: the shards not yet done are dealt round-robin over the ranks, each rank writes
its own shard files and progress records, and after a barrier rank 0 assembles the image index and
the manifest. A shard's bytes depend only on its images, so the folder is the same, byte for byte,
as a one-process run (and can be resumed by any number of processes).

fp16 (the default) cannot hold values beyond +-65504: such values are clamped to +-65504, counted per
layer and token kind, reported in the manifest (`n_clamped`) and in a warning line. NaN or infinite
values from the model itself are an error: nothing of that shard is kept.
"""

import contextlib
import ctypes
import math
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import traitscope
from traitscope import dist
from traitscope.backbones.base import DEFAULT_GEOMETRY, Backbone, Preprocess
from traitscope.errors import TraitscopeError
from traitscope.files import folder_lock, unlink_quietly
from traitscope.images.source import ImageError, ImageSource, median_aspect, orient_tensor
from traitscope.shards.store import FORMAT, TOKEN_KINDS, NpyAppender, Shards, ShardWriter, content_hash

DTYPES = {"float16": torch.float16, "float32": torch.float32}
DECODES = ("full", "draft", "device")
"""How images are decoded: 'full' (every pixel), 'draft' (JPEGs at reduced size), 'device' (JPEGs on
the model's device: nvJPEG on a CUDA GPU, via torchvision); see the module doc."""
WORKER_KINDS = ("processes", "threads")
"""What decodes in parallel: worker processes (forked; Linux), or threads of this process."""
FP16_MAX = 65504.0
"""Largest finite float16; larger activations are clamped to it in fp16 shards."""


class ShardPlan(NamedTuple):
    """What a build will write, worked out before any image is decoded."""

    dpath: Path
    """The content-addressed folder `<out>/<hash>`."""
    header: dict
    """The manifest's fixed fields."""
    records: list[dict]
    """Every listed image, in listing order."""
    layers: list[int]
    """Resolved (non-negative) layers."""
    token_kinds: list[str]
    images_per_shard: int

    @property
    def n_shards(self) -> int:
        return -(-len(self.records) // self.images_per_shard)

    def shard_records(self, shard: int) -> list[dict]:
        return self.records[shard * self.images_per_shard:(shard + 1) * self.images_per_shard]


def use_geometry(backbone: Backbone, source: ImageSource, geometry: str = DEFAULT_GEOMETRY,
                 resolution: int | None = None) -> None:
    """Set the backbone's input geometry and resolution for this collection: under 'grid' the patch grid
    takes the median aspect ratio of the source's images (see `Preprocess.with_geometry`)."""
    aspect = median_aspect(source, source.records()) if geometry == "grid" else 1.0
    backbone.set_preprocess(backbone.preprocess.with_geometry(geometry, resolution, backbone.patch_size, aspect))


def plan_shards(source: ImageSource, backbone: Backbone, layers: list[int], out_dpath: str | Path,
                token_kinds=TOKEN_KINDS, dtype: str = "float16", images_per_shard: int = 1024,
                decode: str = "full") -> ShardPlan:
    """Resolve the layers, list the images and name the folder: everything but the computation."""
    if dtype not in DTYPES:
        raise TraitscopeError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if decode not in DECODES:
        raise TraitscopeError(f"unknown decode {decode!r}; use one of {', '.join(DECODES)}")
    unknown = [kind for kind in token_kinds if kind not in TOKEN_KINDS]
    if unknown or not token_kinds:
        raise TraitscopeError(f"unknown token kind(s) {unknown or token_kinds!r}; "
                              f"use one or both of {', '.join(TOKEN_KINDS)}")
    if images_per_shard < 1:
        raise TraitscopeError(f"images_per_shard must be at least 1, not {images_per_shard}")
    token_kinds = [kind for kind in TOKEN_KINDS if kind in token_kinds]
    resolved = backbone.resolve_layers(list(layers))
    records = source.records()
    if not records:
        raise TraitscopeError(f"no images in {source.spec}")

    model = backbone.identity()
    preprocess = backbone.preprocess.to_dict()
    layout = {"n_cls": backbone.layout.n_cls, "n_registers": backbone.layout.n_registers}
    source_identity = source.identity()
    # What the folder's name is a hash of: everything that changes a stored byte, and nothing else
    # (not the description line, the batch size, the device or the code version).
    identity = {
        "format": FORMAT,
        "model": {k: v for k, v in model.items() if k != "description"},
        "layout": layout,
        "preprocess": preprocess,
        "layers": resolved,
        "token_kinds": token_kinds,
        "dtype": dtype,
        "images_per_shard": images_per_shard,
        "source": source_identity,
    }
    if decode != "full":  # folders decoded in full keep the names they had before this option
        identity["decode"] = decode
    digest = content_hash(identity)
    root = Path(source.root)
    header = {
        "hash": digest,
        "model": model,
        "layers": resolved,
        "token_kinds": token_kinds,
        "d_model": {str(layer): int(backbone.d_model_at(layer)) for layer in resolved},
        "grid": {str(layer): [int(n) for n in backbone.grid_at(layer)] for layer in resolved},
        "layout": layout,
        "preprocess": preprocess,
        "geometry": backbone.preprocess.geometry,
        "resolution": backbone.preprocess.crop,
        "input_size": list(backbone.preprocess.input_hw),
        "preprocess_reference": backbone.preprocess.reference,
        "dtype": dtype,
        "images_root": str(root.resolve()) if root.exists() else str(root),
        "source": {"spec": source.spec, "kind": source_identity.get("kind"),
                   "identity_sha256": content_hash(source_identity)},
        "patch_labels": list(source.patch_label_names),
        "image_labels": list(source.image_label_names),
        "images_per_shard": images_per_shard,
        "decode": decode,
        "traitscope_version": traitscope.__version__,
    }
    return ShardPlan(Path(out_dpath) / digest, header, records, resolved, token_kinds, images_per_shard)


# --------------------------------------------------------------------------------------------------
# Stage 1 and 2: decode in worker processes (or threads), collate into batches in a thread.


class _Decoded(NamedTuple):
    record: dict
    pixels: np.ndarray | None
    """(height, width, 3) uint8 before normalisation (the usual `Preprocess`), or (3, height, width) float32."""
    size: tuple[int, int] | None
    image_labels: np.ndarray | None
    patch_labels: np.ndarray | None
    skipped: str | None
    jpeg: tuple[bytes, int] | None = None
    """decode='device': the JPEG file's bytes and EXIF orientation, decoded where the model runs
    (`pixels` is then None)."""


class _Batch(NamedTuple):
    shard: int
    pixels: torch.Tensor
    """(b, height, width, 3) uint8, normalised on the device by `_normalize`, or (b, 3, height, width) float."""
    labels: dict[str, np.ndarray]
    """'labels/images' -> (b, n_image_labels), 'labels/patches' -> (b, n_patches, n_patch_labels)."""
    n_listed: int
    """Listed images (kept or skipped) this batch moves the progress bar by."""


class _ShardEnd(NamedTuple):
    shard: int
    images: list[dict]
    """The shard's listing entries; `row` is the row within the shard."""
    n_listed: int


class _Failed(NamedTuple):
    error: BaseException


_DONE = object()


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    """Put into a bounded queue, giving up when `stop` is set (the consumer has gone)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue
    raise _Stopped


class _Stopped(Exception):
    pass


class DecodeJob:
    """One listed image -> what the model and the label files need: the one decoding function, run by
    worker processes or threads alike (picklable; no torch ops for the usual `Preprocess`)."""

    def __init__(self, source: ImageSource, backbone: Backbone, layer: int, decode: str):
        self.source = source
        self.preprocess = backbone.preprocess
        self.uint8 = type(self.preprocess) is Preprocess  # its __call__ is crop_image + `_normalize`
        self.draft = decode == "draft" and self.uint8
        self.on_device = decode == "device" and self.uint8
        self.grid = tuple(backbone.grid_at(layer))
        self.want_image_labels = bool(source.image_label_names)
        self.want_patch_labels = bool(source.patch_label_names)

    def __call__(self, record: dict) -> _Decoded:
        try:
            jpeg = self.source.jpeg(record) if self.on_device else None
            if jpeg is not None:
                data, size, orientation = jpeg
                pixels, jpeg = None, (data, orientation)
            elif self.uint8:
                decoded = self.source.decode(record, self.preprocess.resized_size if self.draft else None)
                pixels = np.asarray(self.preprocess.crop_image(decoded.image, decoded.size, decoded.box))
                size = decoded.size
            else:
                image = self.source.load(record)
                size, pixels = image.size, self.preprocess(image).numpy()
            image_labels = self.source.image_labels(record) if self.want_image_labels else None
            patch_labels = (self.source.patch_labels(record, self.preprocess, self.grid)
                            if self.want_patch_labels else None)
        except ImageError as err:
            return _Decoded(record, None, None, None, None, err.reason)
        return _Decoded(record, pixels, size, image_labels, patch_labels, None, jpeg)

    def on(self, device: torch.device, kept: list[_Decoded]) -> torch.Tensor:
        """(b, height, width, 3) uint8 on `device`: the JPEGs among `kept` decoded there in one call,
        the others' pixels copied there."""
        from torchvision.io import ImageReadMode, decode_jpeg

        out = [None if d.jpeg is not None else torch.from_numpy(np.asarray(d.pixels)).to(device) for d in kept]
        jpegs = [i for i, d in enumerate(kept) if d.jpeg is not None]
        if jpegs:
            datas = [torch.frombuffer(bytearray(kept[i].jpeg[0]), dtype=torch.uint8) for i in jpegs]
            try:
                images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # one bad file fails the batch: one at a time
                images = [self._one(kept[i], data, device) for i, data in zip(jpegs, datas)]
            for i, image_chw in zip(jpegs, images):
                out[i] = self.preprocess.crop_tensor(orient_tensor(image_chw, kept[i].jpeg[1]))
        return torch.stack(out)

    def _one(self, decoded: _Decoded, data: torch.Tensor, device: torch.device) -> torch.Tensor:
        """One JPEG decoded on the device, (3, h, w); where its decoder refuses it, Pillow's decoding
        of the file as a (3, h, w) tensor there."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            try:
                image = self.source.decode(decoded.record).image  # upright already
            except ImageError as err:
                raise TraitscopeError(f"{_image_name(self.source, decoded.record)}: {err.reason} (rerun with "
                                      "--decode full to skip such files)") from err
            turned_back = {6: 8, 8: 6}.get(decoded.jpeg[1], decoded.jpeg[1])  # on_device turns it upright again
            return orient_tensor(torch.from_numpy(np.asarray(image)).permute(2, 0, 1), turned_back).to(device)


_WORKER_JOB: DecodeJob | None = None
"""In a worker process: the job it runs (set once when the process starts)."""


def _start_worker(job: DecodeJob, parent_pid: int) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job
    torch.set_num_threads(1)  # a custom Preprocess's torch ops: one thread per worker
    with contextlib.suppress(Exception):  # Linux: die with the run, even when it is killed by SIGKILL
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the run died before the line above took effect
            os._exit(0)


_PR_SET_PDEATHSIG = 1


def _run_in_worker(record: dict) -> _Decoded:
    return _WORKER_JOB(record)


def decode_pool(job: DecodeJob, n_workers: int, kind: str) -> tuple[Executor, object]:
    """The executor and the function it runs per record. Worker processes are forked at once, from
    the calling thread (call it before starting other threads); without `fork` (macOS, Windows),
    threads. PIL releases the GIL while it decodes and resizes, but not while it parses headers."""
    if kind == "processes" and "fork" in multiprocessing.get_all_start_methods():
        pool = ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_start_worker, initargs=(job, os.getpid()))
        pool.submit(int).result()  # forks every worker now, from this thread
        return pool, _run_in_worker
    return ThreadPoolExecutor(n_workers, thread_name_prefix="traitscope-decode"), job


class _Loader(threading.Thread):
    """Runs the decode job over the images of the shards to do in a pool of workers and hands out
    batches in listing order; batches never cross a shard boundary."""

    def __init__(self, plan: ShardPlan, job: DecodeJob, pool: tuple[Executor, object], shards: list[int],
                 batch_size: int, n_workers: int, strict: bool, pin: bool, device: torch.device):
        super().__init__(name="traitscope-shards-loader", daemon=True)
        self.plan, self.source, self.shards, self.job, self.device = plan, job.source, shards, job, device
        self.pool, self.run_job = pool
        self.batch_size, self.n_workers, self.strict, self.pin = batch_size, n_workers, strict, pin
        self.uint8 = job.uint8
        self.want_image_labels, self.want_patch_labels = job.want_image_labels, job.want_patch_labels
        self.out: queue.Queue = queue.Queue(maxsize=3)
        self.stop = threading.Event()

    def _collate(self, shard: int, kept: list[_Decoded], n_listed: int) -> _Batch:
        if self.job.on_device:
            pixels = self.job.on(self.device, kept)
        else:
            first = kept[0].pixels
            dtype = torch.from_numpy(np.empty(0, first.dtype)).dtype
            pixels = torch.empty((len(kept), *first.shape), dtype=dtype, pin_memory=self.pin)
            np.stack([np.asarray(d.pixels) for d in kept], out=pixels.numpy())
        labels = {}
        if self.want_image_labels:
            labels["labels/images"] = np.stack([np.asarray(d.image_labels, dtype=np.uint8) for d in kept])
        if self.want_patch_labels:
            labels["labels/patches"] = np.stack([np.asarray(d.patch_labels, dtype=np.uint8) for d in kept])
        return _Batch(shard, pixels, labels, n_listed)

    def run(self) -> None:
        try:
            self._run(self.pool)
            _put(self.out, _DONE, self.stop)
        except _Stopped:  # the main thread has given up
            pass
        except BrokenProcessPool as err:
            err = TraitscopeError("a decoding worker process died (killed, or out of memory); rerun to resume, "
                                  "or use --decode-workers threads")
            with contextlib.suppress(_Stopped):
                _put(self.out, _Failed(err), self.stop)
        except BaseException as err:  # handed to the main thread, which raises it
            with contextlib.suppress(_Stopped):
                _put(self.out, _Failed(err), self.stop)

    def _run(self, pool: Executor) -> None:
        todo = [(shard, record) for shard in self.shards for record in self.plan.shard_records(shard)]
        window = max(2 * self.batch_size, 4 * self.n_workers)
        pending: deque = deque()
        upcoming = iter(todo)

        def top_up() -> None:
            while len(pending) < window:
                nxt = next(upcoming, None)
                if nxt is None:
                    return
                pending.append(pool.submit(self.run_job, nxt[1]))

        for shard in self.shards:
            entries: list[dict] = []
            kept: list[_Decoded] = []
            n_listed = n_kept = 0
            for record in self.plan.shard_records(shard):
                top_up()
                decoded = pending.popleft().result()
                n_listed += 1
                entry = {"index": record["index"], "path": record["path"], "label": record.get("label"),
                         "width": None, "height": None, "row": None, "skipped": decoded.skipped}
                if decoded.skipped is not None:
                    if self.strict:
                        raise TraitscopeError(f"{_image_name(self.source, record)}: {decoded.skipped} "
                                              "(--strict stops at the first unreadable image)")
                else:
                    entry["width"], entry["height"] = decoded.size
                    entry["row"] = n_kept
                    n_kept += 1
                    kept.append(decoded)
                entries.append(entry)
                if len(kept) == self.batch_size:
                    _put(self.out, self._collate(shard, kept, n_listed), self.stop)
                    kept, n_listed = [], 0
            if kept:
                _put(self.out, self._collate(shard, kept, n_listed), self.stop)
                n_listed = 0
            _put(self.out, _ShardEnd(shard, entries, n_listed), self.stop)


def _normalize(pixels_bhwc: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 crops -> the model's input, with the very float32 operations of `Preprocess.__call__`
    (so the same values on any device); done where the model runs, on a quarter of the bytes."""
    x_bchw = pixels_bhwc.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1).to(x_bchw.device)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1).to(x_bchw.device)
    return ((x_bchw - mean) / std).contiguous()


def _image_name(source: ImageSource, record: dict) -> str:
    return str(Path(source.root) / record["path"])


# --------------------------------------------------------------------------------------------------
# Stage 4: write in a thread.


class _WriteBatch(NamedTuple):
    shard: int
    arrays: dict[str, torch.Tensor | np.ndarray]
    """'L{layer}/{kind}' or 'labels/{kind}' -> rows for this batch."""
    ready: torch.cuda.Event | None
    """Set once the device-to-host copies into `arrays` have finished."""


class _WriteShardEnd(NamedTuple):
    shard: int
    first_listed: int
    n_listed: int
    extra: dict


class _Writer(threading.Thread):
    """Appends each batch's rows to the shard's `.tmp` files; at a shard's end renames them into place
    and writes its progress record. An error is kept for the main thread to raise."""

    def __init__(self, store: ShardWriter, row_specs: dict[str, tuple[np.dtype, tuple[int, ...]]]):
        super().__init__(name="traitscope-shards-writer", daemon=True)
        self.store = store
        self.row_specs = row_specs
        self.inbox: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.abort = threading.Event()
        self._open: dict | None = None
        self._open_shard: int | None = None

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.inbox.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _appenders(self, shard: int) -> dict:
        if self._open_shard != shard:
            self._drop()
            self._open = {base: NpyAppender(self.store.dpath / f"{base}-{shard:05d}.npy", dtype, row_shape)
                          for base, (dtype, row_shape) in self.row_specs.items()}
            self._open_shard = shard
        return self._open

    def _drop(self) -> None:
        for appender in (self._open or {}).values():
            appender.abort()
        self._open, self._open_shard = None, None

    def run(self) -> None:
        while True:
            item = self.inbox.get()
            if item is None:
                break
            if self.error is not None or self.abort.is_set():
                continue  # drain, so the main thread never blocks on a full inbox
            try:
                if isinstance(item, _WriteBatch):
                    if item.ready is not None:
                        item.ready.synchronize()
                    appenders = self._appenders(item.shard)
                    for base, rows in item.arrays.items():
                        appenders[base].append(rows.numpy() if isinstance(rows, torch.Tensor) else rows)
                else:
                    appenders = self._appenders(item.shard)
                    n_images = {a.n_rows for a in appenders.values()}
                    assert len(n_images) == 1, f"shard {item.shard}: files disagree on the row count {n_images}"
                    for appender in appenders.values():
                        appender.close()
                    self._open, self._open_shard = None, None
                    rels = [f"{base}-{item.shard:05d}.npy" for base in self.row_specs]
                    self.store.commit_shard(item.shard, item.first_listed, item.n_listed, n_images.pop(), rels,
                                            item.extra)
            except OSError as err:
                if err.filename is None:  # a write() that failed names no file: say which folder
                    err = OSError(err.errno, err.strerror, str(self.store.dpath))
                self.error = err
                self._drop()
            except BaseException as err:
                self.error = err
                self._drop()
        self._drop()


# --------------------------------------------------------------------------------------------------
# Stage 3 and the whole build.


@contextlib.contextmanager
def _folder_lock(dpath: Path):
    """One job per shard folder: a second run on the same folder fails with a clear line.

    In a distributed job rank 0 holds the lock for all ranks and tells them whether it got it.
    """
    with contextlib.ExitStack() as stack:
        busy = None
        if dist.world().is_main:
            try:
                stack.enter_context(folder_lock(dpath, "traitscope shards"))
            except TraitscopeError as err:
                busy = str(err)
        busy = dist.broadcast(busy)
        if busy:
            raise TraitscopeError(busy)
        yield


def _say(verbose: bool, msg: str, warning: bool = False) -> None:
    if verbose:
        print(f"traitscope shards: warning: {msg}" if warning else msg, file=sys.stderr if warning else sys.stdout,
              flush=True)


def default_workers() -> int:
    """Decoding workers: this process's share of the machine's cores, at most 16."""
    return max(1, min(16, dist.cpus_per_rank()))


def build_shards(source: ImageSource, backbone: Backbone, layers: list[int], out_dpath: str | Path,
                 token_kinds=TOKEN_KINDS, dtype: str = "float16", batch_size: int = 64,
                 images_per_shard: int = 1024, strict: bool = False, n_workers: int | None = None,
                 verbose: bool = True, decode: str = "full", decode_workers: str = "processes") -> Shards:
    """Record `layers` of `backbone` over every image of `source` into `<out_dpath>/<hash>/`.

    Returns the finished folder opened for reading. If it is already complete nothing is computed;
    if an earlier run was interrupted, its finished shards are kept and the rest are computed.
    `strict` fails on the first unreadable image instead of skipping it. `decode` is one of `DECODES`
    and `decode_workers` one of `WORKER_KINDS` (see the module doc); `n_workers` how many.

    In a distributed job (see the module doc) every rank calls this with the same arguments, computes
    its round-robin share of the shards, and gets the finished folder back; rank 0 alone prints.
    """
    if batch_size < 1:
        raise TraitscopeError(f"batch size must be at least 1, not {batch_size}")
    if decode_workers not in WORKER_KINDS:
        raise TraitscopeError(f"unknown decode workers {decode_workers!r}; use one of {', '.join(WORKER_KINDS)}")
    dist.check_joined()
    world = dist.world()
    verbose_here = verbose and world.is_main
    plan = plan_shards(source, backbone, layers, out_dpath, token_kinds, dtype, images_per_shard, decode)
    if world.distributed:  # the same folder and the same listing everywhere, or no rank starts
        dist.check_agree("the shard folder and image listing",
                         (plan.dpath.name, len(plan.records), content_hash({"records": plan.records})))
    repair = None
    if dist.broadcast((plan.dpath / "manifest.json").is_file()):
        repair = dist.broadcast(check_complete(plan.dpath, verbose_here) if world.is_main else None)
        if repair is None:
            shards = Shards(plan.dpath)
            _say(verbose_here, f"{plan.dpath} is already complete ({shards.n_images} images, {shards.n_shards} "
                               "shards; every file matches its sha256)")
            return shards
        _say(verbose_here, f"{repair[0]}; recomputing {len(repair[1])} damaged shard(s) and the manifest", warning=True)

    with _folder_lock(plan.dpath):
        store = ShardWriter(plan.dpath, plan.header)
        todo = None
        if world.is_main:  # before any rank writes: clear what an interrupted run left, list what is left to do
            if repair is not None:  # the damaged shards are done again, and the manifest is written anew
                for shard in repair[1]:
                    unlink_quietly(store.progress_fpath(shard))
                unlink_quietly(plan.dpath / "manifest.json")
            store.remove_stale_tmp()
            todo = [s for s in range(plan.n_shards) if not store.shard_done(s)]
        todo = dist.broadcast(todo)
        n_done = sum(len(plan.shard_records(s)) for s in range(plan.n_shards) if s not in set(todo))
        if n_done:
            _say(verbose_here, f"resuming {plan.dpath}: {plan.n_shards - len(todo)} of {plan.n_shards} shards "
                               "already written")
        mine = todo[world.rank::world.size]  # round-robin: disjoint, and balanced even when resuming
        if world.distributed:
            _say(verbose_here, f"{len(todo)} shard(s) over {world.size} processes "
                               f"(rank 0 writes {len(mine)}; the progress bar is rank 0's share)")
        t0 = time.perf_counter()
        error = None
        if todo:
            _say(verbose_here, memory_line(plan, source, backbone, batch_size))
        try:
            if mine:
                n_mine = sum(len(plan.shard_records(s)) for s in mine)
                bar = ((len(plan.records), n_done) if not world.distributed else (n_mine, 0))
                job = DecodeJob(source, backbone, plan.layers[0], decode)
                _compute(plan, job, backbone, store, mine, bar, batch_size, strict,
                         n_workers or default_workers(), decode_workers, verbose_here)
        except Exception as err:  # every rank learns of it, instead of waiting for the failed one
            error = err
        dist.raise_if_any(error)
        elapsed = time.perf_counter() - t0
        shards, error = None, None
        if world.is_main:
            try:
                if world.distributed:
                    _wait_for_records(plan, store)
                shards = _finish(plan, store, verbose_here)
            except Exception as err:
                error = err
        dist.raise_if_any(error)
        shards = shards or Shards(plan.dpath)
    n_computed = len(plan.records) - n_done
    if n_computed:
        _say(verbose_here, f"read {n_computed} images in {elapsed:.1f} s ({n_computed / max(elapsed, 1e-9):.1f} images/s)")
    return shards


def memory_line(plan: ShardPlan, source: ImageSource, backbone: Backbone, batch_size: int) -> str:
    """One line, printed before a run starts: the input and the stored bytes per image, and their totals."""
    height, width = backbone.preprocess.input_hw
    rows, cols = backbone.grid_at(plan.layers[-1])
    per_image = sum(dtype.itemsize * int(np.prod(shape)) for dtype, shape in _row_specs(plan, source, backbone).values())
    input_bytes = 3 * height * width * 4
    return (f"per image: a {width}x{height} px input ({backbone.preprocess.geometry}, {rows}x{cols} patches), "
            f"{_mb(input_bytes)} as float32 ({_mb(input_bytes * batch_size)} per batch of {batch_size}); "
            f"{_mb(per_image)} of activations stored, {_mb(per_image * len(plan.records))} for "
            f"{len(plan.records)} images")


COARSE_PATCHES = 64
"""Fewer patch tokens per image than this (a CNN's last stage at 224 px has 49) earns a hint: on CamVid
at 224 px, 48 per frame left the SAEs behind k-means, and 448 px turned that round (docs/alignment.md)."""


def coarse_grid_hint(backbone: Backbone, layers: list[int]) -> str | None:
    """A line suggesting a larger --resolution where one of `layers` (as the user named them) has few
    patch tokens per image."""
    grids = {layer: backbone.grid_at(backbone.resolve_layers([layer])[0]) for layer in layers}
    layer = min(layers, key=lambda layer: math.prod(grids[layer]))
    rows, cols = grids[layer]
    if rows * cols >= COARSE_PATCHES:
        return None
    side = backbone.preprocess.input_hw[0] // rows
    return (f"layer {layer} has {rows}x{cols} patch tokens per image, one per {side} px of the input; for traits "
            f"smaller than that, --resolution {2 * backbone.preprocess.crop} gives four times as many")


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.2f} MB" if n_bytes < 1e9 else f"{n_bytes / 1e9:.2f} GB"


def check_complete(dpath: Path, progress: bool = False) -> tuple[str, list[int]] | None:
    """None when a complete shard folder checks out (manifest, image index, every file's sha256);
    else (what is wrong, the shards to recompute)."""
    try:
        shards = Shards(dpath)
        shards.listing()
        damaged = shards.damaged(progress)
    except TraitscopeError as err:  # the manifest or the index: rebuilt from the shards' records
        return str(err).split("; ")[0], []
    if not damaged:
        return None
    more = f" (and {len(damaged) - 1} more shard(s))" if len(damaged) > 1 else ""
    return f"{damaged[0][1]}{more}", [shard for shard, _ in damaged]


def _row_specs(plan: ShardPlan, source: ImageSource, backbone: Backbone) -> dict[str, tuple[np.dtype, tuple]]:
    """Each shard file's base name -> (dtype, shape of one image's rows)."""
    dtype = np.dtype(plan.header["dtype"])
    specs = {}
    for layer in plan.layers:
        d_model = backbone.d_model_at(layer)
        rows, cols = backbone.grid_at(layer)
        if "patches" in plan.token_kinds:
            specs[f"L{layer}/patches"] = (dtype, (rows * cols, d_model))
        if "cls" in plan.token_kinds:
            specs[f"L{layer}/cls"] = (dtype, (d_model,))
    if source.image_label_names:
        specs["labels/images"] = (np.dtype(np.uint8), (len(source.image_label_names),))
    if source.patch_label_names:
        rows, cols = backbone.grid_at(plan.layers[0])
        specs["labels/patches"] = (np.dtype(np.uint8), (rows * cols, len(source.patch_label_names)))
    return specs


def _compute(plan: ShardPlan, job: DecodeJob, backbone: Backbone, store: ShardWriter, todo: list[int],
             bar_range: tuple[int, int], batch_size: int, strict: bool, n_workers: int, workers: str,
             verbose: bool) -> None:
    """Compute and write the shards `todo`; `bar_range` is the progress bar's (total, initial) in images."""
    device = next(iter(backbone.parameters())).device
    cuda = device.type == "cuda"
    out_dtype = DTYPES[plan.header["dtype"]]
    fp16 = out_dtype == torch.float16
    keys = [(layer, kind) for layer in plan.layers for kind in plan.token_kinds]

    pool = decode_pool(job, n_workers, workers)  # first: worker processes fork before any other thread starts
    loader = _Loader(plan, job, pool, todo, batch_size, n_workers, strict, pin=cuda, device=device)
    writer = _Writer(store, _row_specs(plan, job.source, backbone))
    bar = tqdm(total=bar_range[0], initial=bar_range[1], unit="img", desc="shards", dynamic_ncols=True,
               disable=not verbose, file=sys.stderr, smoothing=0.1)
    loader.start()
    writer.start()
    ok = False
    try:
        with torch.inference_mode():
            # Per (layer, kind): [non-finite count, clamped count], summed on the device, read once a shard.
            counts = torch.zeros((len(keys), 2), dtype=torch.int64, device=device)
            while True:
                item = loader.out.get()
                if item is _DONE:
                    break
                if isinstance(item, _Failed):
                    raise item.error
                if isinstance(item, _Batch):
                    pixels_bchw = item.pixels.to(device, non_blocking=True)
                    if pixels_bchw.dtype == torch.uint8:
                        pixels_bchw = _normalize(pixels_bchw, backbone.preprocess)
                    acts = backbone.record(pixels_bchw, plan.layers)
                    arrays: dict = {}
                    for i, (layer, kind) in enumerate(keys):
                        acts_bd = acts[layer].patches_bpd if kind == "patches" else acts[layer].cls_bd
                        counts[i, 0] += (~torch.isfinite(acts_bd)).sum()
                        if fp16:
                            counts[i, 1] += (acts_bd.abs() > FP16_MAX).sum()
                            acts_bd = acts_bd.clamp(-FP16_MAX, FP16_MAX)
                        acts_bd = acts_bd.to(out_dtype)
                        if cuda:
                            host = torch.empty(acts_bd.shape, dtype=out_dtype, pin_memory=True)
                            host.copy_(acts_bd, non_blocking=True)
                            acts_bd = host
                        elif acts_bd.device.type != "cpu":  # mps
                            acts_bd = acts_bd.cpu()
                        arrays[f"L{layer}/{kind}"] = acts_bd
                    ready = None
                    if cuda:
                        ready = torch.cuda.Event()
                        ready.record()
                    writer.put(_WriteBatch(item.shard, {**arrays, **item.labels}, ready))
                    bar.update(item.n_listed)
                else:  # _ShardEnd
                    per_key = counts.tolist()
                    counts.zero_()
                    bad = [f"L{layer}/{kind}" for (layer, kind), (n_bad, _) in zip(keys, per_key) if n_bad]
                    if bad:
                        first = plan.shard_records(item.shard)[0]["index"]
                        raise TraitscopeError(
                            f"{backbone.name} produced NaN or infinite activations ({', '.join(bad)}) for images "
                            f"{first}..{first + len(plan.shard_records(item.shard)) - 1}; its weights or inputs "
                            "are broken, nothing of that shard was kept")
                    clamped = {f"L{layer}/{kind}": n for (layer, kind), (_, n) in zip(keys, per_key) if n}
                    records = plan.shard_records(item.shard)
                    extra = {"images": item.images, "n_clamped": clamped}
                    writer.put(_WriteShardEnd(item.shard, item.shard * plan.images_per_shard, len(records), extra))
                    bar.update(item.n_listed)
        writer.put(None)
        writer.join()
        if writer.error is not None:
            raise writer.error
        ok = True
    finally:
        bar.close()
        if not ok:  # stop the other stages; the writer drops the shard it was writing
            loader.stop.set()
            writer.abort.set()
            while writer.is_alive():
                with contextlib.suppress(queue.Full):
                    writer.inbox.put(None, timeout=0.1)
                    break
            writer.join(timeout=30)
            loader.join(timeout=30)
        pool[0].shutdown(wait=ok, cancel_futures=True)


def _wait_for_records(plan: ShardPlan, store: ShardWriter, timeout_s: float = 120.0) -> None:
    """Give shard records other machines wrote time to appear: a network file system (NFS) may cache
    a directory's listing for a while. `_finish` names any still missing."""
    deadline = time.monotonic() + timeout_s
    missing = [s for s in range(plan.n_shards) if not store.shard_done(s)]
    while missing and time.monotonic() < deadline:
        time.sleep(1.0)
        missing = [s for s in missing if not store.shard_done(s)]


def _finish(plan: ShardPlan, store: ShardWriter, verbose: bool) -> Shards:
    """Assemble the image index from the shards' records, write it and the manifest, and report."""
    listing: list[dict] = []
    clamped: dict[str, int] = {}
    n_kept = 0
    for shard in range(plan.n_shards):
        record = store.shard_record(shard)
        if record is None:
            raise TraitscopeError(f"{plan.dpath}: shard {shard} is missing after the run; rerun to finish it")
        for entry in record["images"]:
            entry = dict(entry)
            if entry["row"] is not None:
                entry["row"] += n_kept
            listing.append(entry)
        n_kept += record["n_images"]
        for key, n in record["n_clamped"].items():
            clamped[key] = clamped.get(key, 0) + n
    skipped = [e for e in listing if e["skipped"] is not None]
    if n_kept == 0:
        e = skipped[0]
        raise TraitscopeError(f"none of the {len(listing)} images could be read (e.g. {e['path']}: {e['skipped']})")
    store.header["n_clamped"] = dict(sorted(clamped.items()))
    shards = store.finish(listing)
    if clamped:
        total = sum(clamped.values())
        where = ", ".join(f"{k}: {n}" for k, n in sorted(clamped.items()))
        _say(verbose, f"{total} activation values were beyond the float16 range and were clamped to +-{FP16_MAX:g} "
                      f"({where}); use --dtype float32 to keep them exactly", warning=True)
    if skipped:
        shown = 20
        _say(verbose, f"skipped {len(skipped)} of {len(listing)} images; all are listed with the reason in "
                      f"{plan.dpath / 'images.jsonl'}:" + "".join(f"\n  {e['path']}: {e['skipped']}" for e in skipped[:shown])
                      + (f"\n  ... and {len(skipped) - shown} more" if len(skipped) > shown else ""), warning=True)
    return shards


__all__ = ["build_shards", "plan_shards", "use_geometry", "ShardPlan", "DTYPES", "DECODES", "FP16_MAX", "WORKER_KINDS",
           "DecodeJob", "decode_pool"]
