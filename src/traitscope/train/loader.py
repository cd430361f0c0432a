"""Training tokens from memory-mapped shards: a split by image, and a shuffled, prefetching loader.

The split holds out whole images: no token of a validation image is ever trained on.

The loader never holds the data set in memory. Each epoch visits the training rows in chunks of
`chunk_rows` consecutive rows (one large contiguous read each) in a seeded random order; a *block* of
chunks fills the shuffle buffer, and every batch mixes rows drawn at random from all of its chunks.
A background thread reads the next block while the trainer consumes the current one. Everything is
a function of (seed, epoch, block), so the stream is the same on every run, and the position
(epoch, block, offset) is all a checkpoint needs to continue it.

Each chunk is checked for NaN/Inf the first time it loads (the files do not change); the error
names the shard file and row.
"""

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from traitscope.errors import TraitscopeError
from traitscope.shards.store import Shards, TokenArray


class Chunk(NamedTuple):
    """Rows [start, stop) of one shard file of one token source."""

    source: int
    file: int
    start: int
    stop: int


VAL_RUNS = 5
"""A contiguous split holds out this many runs of neighbouring images (fewer when there are fewer)."""


def _even_parts(total: int, n: int) -> np.ndarray:
    return np.full(n, total // n) + (np.arange(n) < total % n)


def contiguous_rows(n_images: int, n_val: int, n_runs: int = VAL_RUNS) -> np.ndarray:
    """`n_val` sorted rows in `n_runs` runs of neighbours, spread evenly: the other rows are cut into
    n_runs + 1 even gaps, and the runs sit between them (gap, run, gap, ..., run, gap)."""
    n_runs = max(1, min(n_runs, n_val))
    runs, gaps = _even_parts(n_val, n_runs), _even_parts(n_images - n_val, n_runs + 1)
    starts = np.cumsum(gaps[:-1]) + np.concatenate([[0], np.cumsum(runs[:-1])])
    return np.concatenate([np.arange(a, a + r) for a, r in zip(starts, runs)])


class TokenSplit:
    """Training and validation tokens of one layer and token kind, split by image."""

    def __init__(self, shards: Shards, layer: int, token_kind: str, val_frac: float, seed: int,
                 val_split: str = "random"):
        kinds = ["patches", "cls"] if token_kind == "all" else [token_kind]
        for kind in kinds:
            if kind not in shards.token_kinds:
                raise TraitscopeError(f"{shards.dpath} has no {kind!r} tokens (stored: {', '.join(shards.token_kinds)})"
                                      + ("; use --token-kind patches or cls" if token_kind == "all" else ""))
        self.shards = shards
        self.layer = shards.resolve(layer)
        self.token_kind = token_kind
        self.arrays: list[TokenArray] = [shards.acts(self.layer, kind) for kind in kinds]
        self.d_model = self.arrays[0].width
        n_images = shards.n_images
        if not 0 <= val_frac < 1:
            raise TraitscopeError(f"val_frac must be in [0, 1), not {val_frac}")
        n_val = min(max(1, round(val_frac * n_images)), n_images - 1) if val_frac > 0 else 0
        if n_images < 1 or n_images - n_val < 1:
            raise TraitscopeError(f"{shards.dpath} has {n_images} image(s): too few to train on")
        if val_split not in ("random", "contiguous"):
            raise TraitscopeError(f"val_split must be 'random' or 'contiguous', not {val_split!r}")
        order = np.random.default_rng([seed, 1]).permutation(n_images)
        self.is_val = np.zeros(n_images, dtype=bool)
        self.is_val[contiguous_rows(n_images, n_val) if val_split == "contiguous" else order[:n_val]] = True
        self.val_rows = np.flatnonzero(self.is_val)
        self.val_order = order[self.is_val[order]]  # evaluation visits validation images in this order
        self.validity = shards.patch_validity(self.layer) if "patches" in kinds else None
        """Which patch tokens hold image pixels (None: all); padding patches are never trained or evaluated on."""
        self.n_train_tokens = int(sum(self._tokens_per_image(a)[~self.is_val].sum() for a in self.arrays))

    def _tokens_per_image(self, array: TokenArray) -> np.ndarray:
        """(n_images,) tokens of each image that count: all of them, or the patches holding image pixels."""
        if self.validity is None or array.rows_per_item == 1:
            return np.full(self.shards.n_images, array.rows_per_item, dtype=np.int64)
        box = self.validity.boxes
        return (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])

    @property
    def dtype(self) -> np.dtype:
        return self.arrays[0].dtype

    def chunks(self, chunk_rows: int) -> list[Chunk]:
        """Every training-file range of up to chunk_rows rows (validation rows are dropped at read time)."""
        out = []
        for a, array in enumerate(self.arrays):
            for f, rows in enumerate(array.maps):
                first_image = int(array.offsets[f]) // array.rows_per_item
                n_images = rows.shape[0] // array.rows_per_item
                if n_images and self.is_val[first_image:first_image + n_images].all():
                    continue
                out.extend(Chunk(a, f, s, min(s + chunk_rows, rows.shape[0]))
                           for s in range(0, rows.shape[0], chunk_rows))
        return out

    def train_mask(self, chunk: Chunk) -> np.ndarray | None:
        """Boolean mask of the chunk's training rows (not a validation image, not a padding patch), or None
        when all of them are training rows."""
        array = self.arrays[chunk.source]
        rows = np.arange(chunk.start, chunk.stop) + int(array.offsets[chunk.file])
        keep = ~self.is_val[rows // array.rows_per_item]
        if self.validity is not None and array.rows_per_item > 1:
            keep &= self.validity.of_rows(rows)
        return None if keep.all() else keep

    def describe_row(self, chunk: Chunk, local_row: int) -> str:
        array = self.arrays[chunk.source]
        row = chunk.start + local_row
        global_row = row + int(array.offsets[chunk.file])
        image, token = divmod(global_row, array.rows_per_item)
        rel = Path(array.fpaths[chunk.file])
        where = f"{rel.parent.name}/{rel.name} row {row}"
        if array.rows_per_item > 1:
            where += f" (image row {image}, patch {token})"
        else:
            where += f" (image row {image})"
        return where

    def val_batches(self, batch_size: int, max_tokens: int) -> Iterator[torch.Tensor]:
        """Validation tokens (float32) in batches: every token of validation images, up to max_tokens."""
        pending, n_pending = [], 0
        for rows in self._val_rows(max_tokens):
            pending.append(rows)
            n_pending += len(rows)
            if n_pending >= batch_size:
                block = np.concatenate(pending)
                n_full = len(block) // batch_size * batch_size
                for start in range(0, n_full, batch_size):
                    yield torch.from_numpy(block[start:start + batch_size].astype(np.float32))
                pending, n_pending = [block[n_full:]], len(block) - n_full
        if n_pending:
            yield torch.from_numpy(np.concatenate(pending).astype(np.float32))

    def _val_rows(self, max_tokens: int) -> Iterator[np.ndarray]:
        """Each validation image's tokens (all kinds), checked, until max_tokens are out."""
        n_left = max_tokens
        for image in self.val_order:
            for array in self.arrays:
                rows = array.read(int(image) * array.rows_per_item, (int(image) + 1) * array.rows_per_item)
                if self.validity is not None and array.rows_per_item > 1:
                    rows = rows[self.validity.of_images(int(image), int(image) + 1)[0]]
                rows = rows[:n_left]
                finite = np.isfinite(rows).all(axis=1)
                if not finite.all():
                    raise TraitscopeError(f"NaN/Inf in activations of validation image row {image} "
                                          f"(token {int(np.flatnonzero(~finite)[0])}) in {self.shards.dpath}")
                yield rows
                n_left -= len(rows)
                if n_left <= 0:
                    return


class LoaderState(NamedTuple):
    """Where the token stream is: the next row is row `offset` of block `block` of epoch `epoch`."""

    epoch: int = 0
    block: int = 0
    offset: int = 0


class Block(NamedTuple):
    """One shuffle buffer: the training rows of a few chunks, each chunk's rows shuffled in place,
    and a random interleaving of the chunks that decides which chunk every emitted row comes from."""

    rows: np.ndarray
    """(capacity, d_model) in the shards' dtype; chunk j's rows are rows[starts[j]:starts[j + 1]]."""
    starts: np.ndarray
    """(n_chunks + 1,) int64 region boundaries."""
    labels: np.ndarray
    """(n_rows,) int16 the chunk of each emitted row, a seeded permutation of the chunk sizes."""


class ShuffledLoader:
    """Endless shuffled batches (batch_size, d_model) float32 of training tokens; see the module doc.

    A background thread fills a block: each chunk's training rows are copied out of its memory map
    (one contiguous range of the file) in shuffled order, and checked for NaN/Inf the first time. A
    batch then takes its rows chunk by chunk as the block's interleaving says (contiguous slices, so
    a batch costs a memory copy, not a random gather across the whole buffer): every batch mixes all
    chunks of the block, and every training row is emitted once per epoch. numpy only, so neither
    side waits on torch's compute threads. Block buffers are recycled (batches are copies).
    """

    def __init__(self, split: TokenSplit, batch_size: int, seed: int, chunk_rows: int = 4096,
                 buffer_mb: int = 256, state: LoaderState | None = None, prefetch: bool = True, stream: int = 0,
                 rows: slice | None = None, pin_memory: bool = False, as_stored: bool = False):
        """`stream` picks an independent order for the same seed (e.g. the start-up sample).

        `rows` keeps only those rows of every batch (a data-parallel rank's share; the stream and the
        state stay those of the whole batch). `pin_memory` assembles batches in page-locked memory, so
        that `.to("cuda", non_blocking=True)` copies them without stalling (CUDA only). `as_stored`
        gives batches in the shards' dtype (float16 by default: half the bytes to copy to a GPU, cast
        there) instead of float32.
        """
        self.split = split
        self.batch_size = batch_size
        self.rows = rows
        self.pin_memory = pin_memory
        self.out_dtype = split.dtype if as_stored else np.dtype(np.float32)
        self.seed = seed
        self.stream = stream
        self.chunk_rows = chunk_rows
        self.chunk_list = split.chunks(chunk_rows)
        if not self.chunk_list:
            raise TraitscopeError("no training tokens left after the validation split")
        chunk_bytes = chunk_rows * split.d_model * split.dtype.itemsize
        self.chunks_per_block = max(1, min(len(self.chunk_list), (buffer_mb << 20) // max(1, chunk_bytes)))
        self.blocks_per_epoch = -(-len(self.chunk_list) // self.chunks_per_block)
        self.state = state or LoaderState()
        self._block: Block | None = None
        self._taken: np.ndarray | None = None  # rows of each chunk of the current block already emitted
        self._prefetch = prefetch
        self._blocks: Iterator | None = None
        self._ready: queue.Queue = queue.Queue(maxsize=1)
        self._free: queue.Queue = queue.Queue()
        self._n_buffers = 0
        self._checked: set[Chunk] = set()  # chunks found free of NaN/Inf (the files do not change)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the stream: a function of (seed, stream, epoch, block) only ---
    def block_chunks(self, epoch: int, block: int) -> list[Chunk]:
        order = np.random.default_rng([self.seed, self.stream, 2, epoch]).permutation(len(self.chunk_list))
        picked = order[block * self.chunks_per_block:(block + 1) * self.chunks_per_block]
        return [self.chunk_list[i] for i in picked]

    def read_block(self, epoch: int, block: int, rows: np.ndarray | None = None) -> Block:
        """Block `block` of epoch `epoch`, into `rows` (a recycled buffer) if given."""
        capacity = self.chunks_per_block * self.chunk_rows
        if rows is None:
            rows = np.empty((capacity, self.split.d_model), dtype=self.split.dtype)
        rng = np.random.default_rng([self.seed, self.stream, 3, epoch, block])
        starts = [0]
        for chunk in self.block_chunks(epoch, block):
            src = self.split.arrays[chunk.source].maps[chunk.file][chunk.start:chunk.stop]
            mask = self.split.train_mask(chunk)
            keep = np.arange(len(src)) if mask is None else np.flatnonzero(mask)
            dst = rows[starts[-1]:starts[-1] + len(keep)]
            np.take(src, keep[rng.permutation(len(keep))], axis=0, out=dst, mode="clip")  # 'raise' buffers
            if chunk not in self._checked:
                if not np.isfinite(np.add.reduce(dst.reshape(-1), dtype=np.float32)):
                    self._raise_non_finite(chunk, src, mask)
                self._checked.add(chunk)
            starts.append(starts[-1] + len(keep))
        starts = np.asarray(starts, dtype=np.int64)
        labels = rng.permutation(np.repeat(np.arange(len(starts) - 1, dtype=np.int16), np.diff(starts)))
        return Block(rows, starts, labels)

    def _raise_non_finite(self, chunk: Chunk, rows: np.ndarray, mask: np.ndarray | None) -> None:
        """Name the first training row holding NaN/Inf (a sum that merely overflowed passes)."""
        bad = ~np.isfinite(rows).all(axis=1)
        if mask is not None:
            bad &= mask
        if bad.any():
            raise TraitscopeError(f"NaN/Inf in activations: {self.split.describe_row(chunk, int(np.flatnonzero(bad)[0]))} "
                                  f"of {self.split.shards.dpath}; rebuild those shards (or drop that image)")

    def _blocks_from(self, epoch: int, block: int) -> Iterator[tuple[int, int, Block]]:
        while True:
            yield epoch, block, self.read_block(epoch, block, self._free_buffer())
            block += 1
            if block == self.blocks_per_epoch:
                epoch, block = epoch + 1, 0

    def _free_buffer(self) -> np.ndarray | None:
        """A recycled block buffer; new ones until three exist (being read, queued, being consumed)."""
        if self._n_buffers < 3:
            self._n_buffers += 1
            return None
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        raise _Stopped

    def _producer(self, epoch: int, block: int) -> None:
        try:
            for item in self._blocks_from(epoch, block):
                if not self._put(item):
                    return
        except _Stopped:
            return
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _next_block(self, epoch: int, block: int) -> Block:
        if not self._prefetch:
            self._blocks = self._blocks or self._blocks_from(epoch, block)
            item = next(self._blocks)
        else:
            if self._thread is None:
                self._thread = threading.Thread(target=self._producer, args=(epoch, block), daemon=True)
                self._thread.start()
            item = self._ready.get()
            if isinstance(item, BaseException):
                raise item
        assert item[:2] == (epoch, block), (item[:2], epoch, block)
        return item[2]

    # --- batches ---
    def __iter__(self) -> "ShuffledLoader":
        return self

    def __next__(self) -> torch.Tensor:
        epoch, block, offset = self.state
        parts, need = [], self.batch_size
        while need:
            if self._block is None:
                self._block = self._next_block(epoch, block)
                self._taken = np.bincount(self._block.labels[:offset], minlength=len(self._block.starts) - 1)
            b = self._block
            labels = b.labels[offset:offset + need]
            counts = np.bincount(labels, minlength=len(self._taken))
            for j in np.flatnonzero(counts):
                first = b.starts[j] + self._taken[j]
                parts.append(b.rows[first:first + counts[j]])
            self._taken += counts
            offset += len(labels)
            need -= len(labels)
            if offset >= len(b.labels):
                batch_so_far = np.concatenate(parts)  # copy out before the buffer is recycled
                parts = [batch_so_far]
                self._free.put(b.rows)
                self._block, offset = None, 0
                block += 1
                if block == self.blocks_per_epoch:
                    epoch, block = epoch + 1, 0
        self.state = LoaderState(epoch, block, offset)
        if self.rows is not None or self.pin_memory:
            return self._assemble(parts)
        if len(parts) == 1 and parts[0].base is None and parts[0].dtype == self.out_dtype:
            return torch.from_numpy(parts[0])
        return torch.from_numpy(np.concatenate(parts, dtype=self.out_dtype))  # a cast, if any, in the same copy

    def _assemble(self, parts: list[np.ndarray]) -> torch.Tensor:
        """Rows `self.rows` of the batch made of `parts`, in one copy (into pinned memory if asked)."""
        lo, hi, _ = (self.rows or slice(0, self.batch_size)).indices(self.batch_size)
        out = torch.empty((max(0, hi - lo), self.split.d_model), dtype=torch.from_numpy(np.empty(0, self.out_dtype)).dtype,
                          pin_memory=self.pin_memory)
        out_nd = out.numpy()
        first = 0  # the batch row where the current part starts
        for part in parts:
            a, b = max(lo, first), min(hi, first + len(part))
            if a < b:
                out_nd[a - lo:b - lo] = part[a - first:b - first]
            first += len(part)
        return out

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "ShuffledLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Stopped(Exception):
    """The loader was closed while the producer waited for a free buffer."""
