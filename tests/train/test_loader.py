"""The shuffled loader's batches: what a batch holds (tokens of many images, random patches of each),
and batches that stay intact while the loader reuses its block memory."""

import numpy as np
import pytest
import torch

from shard_fixtures import LAYER, make_shards
from traitscope.train.loader import ShuffledLoader, TokenSplit

N_IMAGES, N_PATCHES, D_MODEL = 200, 64, 64


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """float16 shards whose token (image i, patch p) holds i in column 0 and p in column 1."""
    acts = np.random.default_rng(0).standard_normal((N_IMAGES, N_PATCHES, D_MODEL))
    acts[:, :, 0] = np.arange(N_IMAGES)[:, None]
    acts[:, :, 1] = np.arange(N_PATCHES)[None, :]
    return make_shards(tmp_path_factory.mktemp("tagged"), acts, grid=(8, 8), images_per_shard=20)


def test_a_batch_holds_random_patches_of_every_image_of_its_block(tagged):
    """Chunks of 5 images, 20 chunks (100 images, 2 MB of float32) per block: each batch of 256 tokens
    draws from all of its block's images about equally (as a uniform shuffle of the block would), and the
    patches it takes of one image are spread over the image, not a run of neighbours."""
    split = TokenSplit(tagged, LAYER, "patches", val_frac=0.1, seed=0)
    with ShuffledLoader(split, 256, seed=0, chunk_rows=5 * N_PATCHES, buffer_mb=2) as loader:
        assert (loader.chunks_per_block, loader.blocks_per_epoch) == (20, 2)
        block_images = [{int(c.start + split.arrays[0].offsets[c.file]) // N_PATCHES + i for i in range(5)}
                        for c in loader.block_chunks(0, 0)]
        images_of_block = set().union(*block_images) - set(split.val_rows.tolist())
        n_block_rows = len(images_of_block) * N_PATCHES
        for _ in range(n_block_rows // 256):  # the batches that lie wholly in the first block
            batch = next(loader).numpy()
            assert batch.dtype == np.float32
            images, patches = batch[:, 0].astype(int), batch[:, 1].astype(int)
            assert set(images) <= images_of_block
            per_image = np.bincount(images, minlength=N_IMAGES)[sorted(images_of_block)]
            assert (per_image > 0).mean() > 0.85  # nearly every image of the block (a uniform draw: 94%)
            assert per_image.max() <= 12  # 256 / 90 = 2.8 tokens per image on average
            spans = [np.ptp(patches[images == i]) for i in np.unique(images) if (images == i).sum() >= 4]
            assert np.mean(spans) > N_PATCHES / 2  # 4+ random patches of 64 span ~40; a run of neighbours ~5


def test_batches_held_by_the_caller_stay_intact(tagged):
    """A batch is a view of its block's memory (batches as stored: a float32 batch of these float16
    shards is a cast, a copy): the memory is reused only once no batch refers to it."""
    split = TokenSplit(tagged, LAYER, "patches", val_frac=0.1, seed=0)
    with ShuffledLoader(split, 256, seed=0, chunk_rows=5 * N_PATCHES, buffer_mb=1, as_stored=True) as loader:
        held = [next(loader) for _ in range(3 * split.n_train_tokens // 256)]  # three epochs, every batch kept
    copies = [batch.clone() for batch in held]
    with ShuffledLoader(split, 256, seed=0, chunk_rows=5 * N_PATCHES, buffer_mb=1, as_stored=True) as loader:
        assert all(torch.equal(next(loader), copy) for copy in copies)
    for batch, copy in zip(held, copies):
        assert torch.equal(batch, copy)
    epoch = torch.cat(copies)[:split.n_train_tokens].float()
    assert len(np.unique(epoch[:, 0] * N_PATCHES + epoch[:, 1])) == split.n_train_tokens  # each token once


def test_a_loader_whose_batches_are_dropped_reuses_four_buffers(tagged):
    split = TokenSplit(tagged, LAYER, "patches", val_frac=0.1, seed=0)
    with ShuffledLoader(split, 256, seed=0, chunk_rows=5 * N_PATCHES, buffer_mb=1, as_stored=True) as loader:
        for _ in range(10 * split.n_train_tokens // 256):  # ten epochs, forty blocks
            x_bd = next(loader)
        assert loader.n_buffers <= 4  # reading, ready, in use, and the one the last batch still holds
        assert x_bd.shape == (256, D_MODEL)
