"""Sparse training kernels shared by the TopK family (TopK, BatchTopK, Matryoshka).

A training step of a TopK-style SAE needs one dense product, the pre-activations
`pre_bs = (x − b_dec) @ W_enc + b_enc`. Everything after the selection of the active latents touches
only the nnz = (batch × k) selected entries:

- decoding gathers decoder rows: x̂_b = Σ_j v_bj W_dec[col_bj] (`embedding_bag` with per-sample weights);
- the gradient of the selected pre-activations has nnz non-zeros, so the encoder-weight gradient
  W_enc.grad[:, c] = Σ_{entries with col c} g · x̄_row is a scatter of nnz rows, never x̄ᵀ @ dense;
- the decoder-weight gradient touches only the selected rows, and the code-value gradient is a dot
  product per entry.

The scatters are `embedding_bag` calls over the entries grouped by latent (one stable sort of nnz
integers per selection), the dot products a sampled dense-dense product on the selection's pattern;
both run on the CPU and on CUDA. The gradients are checked against dense autograd in tests/sae/test_sae.py.
"""

import contextlib
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F



class Selection(NamedTuple):
    """The active entries of a (batch, d_sae) code matrix, grouped into 'bags' of consecutive entries.

    A bag is what one decoded output row sums: one token for TopK/BatchTopK, one (token, prefix group)
    pair for Matryoshka. Entries are ordered by bag; `by_latent` orders them by latent for the scatters
    of the weight gradients.
    """

    rows: torch.Tensor
    """(nnz,) int64 token of each entry."""
    cols: torch.Tensor
    """(nnz,) int64 latent of each entry."""
    bags: torch.Tensor
    """(nnz,) int64 bag of each entry, non-decreasing."""
    bag_ptr: torch.Tensor
    """(n_bags + 1,) int64 where each bag's entries start, then nnz (CSR row pointer)."""
    by_latent: torch.Tensor
    """(nnz,) int64 permutation that sorts the entries by latent (stable)."""
    latent_starts: torch.Tensor
    """(d_sae,) int64 where each latent's entries start in the `by_latent` order."""


@contextlib.contextmanager
def one_thread(device: torch.device):
    """Run small CPU ops (about batch × k entries) on one thread: on a busy machine every
    multi-threaded op waits for its slowest thread, which costs more than the op itself."""
    if device.type != "cpu":
        yield
        return
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n_threads)


def make_selection(rows: torch.Tensor, cols: torch.Tensor, bags: torch.Tensor, n_bags: int, d_sae: int) -> Selection:
    """A Selection from entries already ordered by bag."""
    with one_thread(rows.device):
        bag_ptr = torch.zeros(n_bags + 1, dtype=torch.long, device=rows.device)
        torch.cumsum(torch.bincount(bags, minlength=n_bags), 0, out=bag_ptr[1:])
        by_latent = torch.sort(cols, stable=True).indices
        per_latent = torch.bincount(cols, minlength=d_sae)
        return Selection(rows, cols, bags, bag_ptr, by_latent, torch.cumsum(per_latent, 0) - per_latent)


def topk_rows(pre_bs: torch.Tensor, k: int, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly `pre_bs.topk(k, dim=1, sorted=False)` (values, columns), about twice as fast on a CPU.

    Each row is cut into groups of `group` columns. The k groups with the largest maxima hold the
    row's k largest entries (a group outside them has k better maxima, each a distinct larger entry),
    and at least k of their entries are >= the smallest of those maxima, `cut`. So only the entries
    >= cut in those k groups, a few more than k per row, go through the final (small) top-k.
    """
    n_rows, d_sae = pre_bs.shape
    n_groups = d_sae // group
    if d_sae % group or n_groups < 2 * k or pre_bs.device.type != "cpu":
        return pre_bs.topk(k, dim=1, sorted=False)
    best_max, best_group = pre_bs.view(n_rows, n_groups, group).amax(2).topk(k, dim=1, sorted=False)
    cut = best_max.amin(1, keepdim=True)
    row_base = torch.arange(n_rows, device=pre_bs.device)[:, None] * n_groups
    cand = pre_bs.view(-1, group).index_select(0, (best_group + row_base).view(-1)).view(n_rows, k * group)
    with one_thread(pre_bs.device):
        r, c = (cand >= cut).nonzero(as_tuple=True)  # row-major, >= k per row
        per_row = torch.bincount(r, minlength=n_rows)
        pos = torch.arange(len(r), device=r.device) - (torch.cumsum(per_row, 0) - per_row)[r]
        width = int(per_row.max())
        padded = torch.full((n_rows, width), float("-inf"), dtype=pre_bs.dtype, device=pre_bs.device)
        padded[r, pos] = cand[r, c]
        where = torch.zeros((n_rows, width), dtype=torch.long, device=pre_bs.device)
        where[r, pos] = c
        values, j = padded.topk(k, dim=1, sorted=False)
        c_best = where.gather(1, j)
        cols = best_group.gather(1, c_best // group) * group + c_best % group
    return values, cols


def topk_selection(pre_bs: torch.Tensor, k: int, latents: torch.Tensor | None = None,
                   d_sae: int | None = None) -> tuple[torch.Tensor, Selection]:
    """Per-token TopK: values (nnz,) and the selection (k entries per token, one bag per token).

    With `latents`, `pre_bs` holds only those latents' columns (of d_sae in all).
    """
    n_rows = pre_bs.shape[0]
    values_bk, cols_bk = topk_rows(pre_bs, k)
    cols = cols_bk.reshape(-1) if latents is None else latents[cols_bk.reshape(-1)]
    rows = torch.arange(n_rows, device=pre_bs.device).repeat_interleave(k)
    return values_bk.reshape(-1), make_selection(rows, cols, rows, n_rows, d_sae or pre_bs.shape[1])


def scatter_rows(sel: Selection, weights: torch.Tensor, src: torch.Tensor, src_index: torch.Tensor) -> torch.Tensor:
    """(d_sae, width) with out[col_e] = Σ_e weights_e · src[src_index_e]: a weight gradient that touches
    only the selected latents, computed as an `embedding_bag` over the entries grouped by latent."""
    perm = sel.by_latent
    return F.embedding_bag(src_index[perm], src, sel.latent_starts, mode="sum", per_sample_weights=weights[perm])


# A strided sample of the pre-activations estimates the batch threshold; every 97th entry (97 is prime,
# so the sample does not alias with the row length) with a 30% margin leaves, with overwhelming
# probability, more candidates above the estimate than entries to keep.
_SAMPLE_STRIDE = 97
_SAMPLE_MARGIN = 1.3


def batch_topk_flat(pre_bs: torch.Tensor, n_keep: int, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The n_keep largest positive entries of the whole batch: (flat indices sorted ascending, values).

    Exact, and much faster than `topk` over the flattened batch: a strided sample estimates the
    cut; one pass takes the maximum of each group of `group` consecutive entries, and only groups
    whose maximum clears the estimate are read again for their candidates (a few more than n_keep);
    a selection among those finds the exact cut. If the estimate was too high, it is lowered and the
    candidates collected again. Entries <= 0 are never kept (they would decode to zero after the ReLU).
    """
    flat = pre_bs.reshape(-1)
    n_keep = min(n_keep, flat.numel())
    if flat.numel() % group:
        group = 1
    groups = flat.view(-1, group)
    group_max = groups.amax(1) if group > 1 else flat
    sample = flat[::_SAMPLE_STRIDE]
    rank = min(sample.numel(), int(n_keep * sample.numel() / flat.numel() * _SAMPLE_MARGIN) + 16)
    guess = float(sample.topk(rank, sorted=False).values.min()) if rank > 0 else 0.0
    with one_thread(pre_bs.device):
        while True:
            guess = max(guess, 0.0)
            hit_groups = (group_max > guess).nonzero().squeeze(1)
            members = groups.index_select(0, hit_groups)
            g, c = (members > guess).nonzero(as_tuple=True)
            if len(g) >= n_keep or guess == 0.0:
                break
            guess = guess / 2 if guess > 1e-6 else 0.0
        values = members[g, c]
        flat_idx = hit_groups[g] * group + c
        if len(values) > n_keep:
            cut = values.kthvalue(len(values) - n_keep + 1).values
            keep = values >= cut
            flat_idx, values = flat_idx[keep], values[keep]
    return flat_idx, values


class _EncodeAt(torch.autograd.Function):
    """Selected pre-activations as a differentiable function of (W_enc, b_enc, b_dec), sparse backward.

    forward: the values `pre_bs[rows, cols]`, already computed by the one dense GEMM.
    backward: W_enc.grad[:, c] = Σ_{entries of latent c} g · x̄_row (a scatter of nnz rows),
    b_enc.grad[c] = Σ g, b_dec.grad = −W_enc @ b_enc.grad (since x̄ = x − b_dec).
    """

    @staticmethod
    def forward(ctx, values, xc_bd, W_enc, b_enc, b_dec, sel):
        ctx.sel = sel
        ctx.save_for_backward(xc_bd, W_enc)
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values):
        xc_bd, W_enc = ctx.saved_tensors
        sel = ctx.sel
        grad_values = grad_values.contiguous()
        grad_W_enc = grad_b_enc = grad_b_dec = None
        if ctx.needs_input_grad[2]:
            grad_W_enc = scatter_rows(sel, grad_values, xc_bd, sel.rows).t()
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_b_enc = torch.zeros(W_enc.shape[1], dtype=grad_values.dtype, device=grad_values.device)
            grad_b_enc.index_add_(0, sel.cols, grad_values)
            if ctx.needs_input_grad[4]:
                grad_b_dec = -(W_enc @ grad_b_enc)
        return None, None, grad_W_enc, grad_b_enc, grad_b_dec, None


def encode_at(values: torch.Tensor, xc_bd: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
              b_dec: torch.Tensor, sel: Selection) -> torch.Tensor:
    """Attach the selected pre-activation values (nnz,) to the graph of the encoder parameters.

    `xc_bd` is the centred input x − b_dec (no gradient) that produced `values`.
    """
    return _EncodeAt.apply(values, xc_bd, W_enc, b_enc, b_dec, sel)


class _DecodeSparse(torch.autograd.Function):
    """out[bag] = Σ_{entries in bag} v · W_dec[col]; backward touches only the selected rows.

    backward: the value gradient is one dot product per entry, <W_dec[col], grad_out[bag]> (a sampled
    dense-dense product on the selection's pattern); W_dec.grad is a scatter like W_enc's.
    """

    @staticmethod
    def forward(ctx, values, W_dec, sel):
        ctx.sel = sel
        ctx.save_for_backward(values, W_dec)
        return F.embedding_bag(sel.cols, W_dec, sel.bag_ptr[:-1], mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad_out):
        values, W_dec = ctx.saved_tensors
        sel = ctx.sel
        grad_out = grad_out.contiguous()
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore")
                pattern = torch.sparse_csr_tensor(sel.bag_ptr, sel.cols, torch.zeros_like(values),
                                                  (grad_out.shape[0], W_dec.shape[0]), check_invariants=False)
            grad_values = torch.sparse.sampled_addmm(pattern, grad_out, W_dec.t(), beta=0.0).values()
        if ctx.needs_input_grad[1]:
            grad_W_dec = scatter_rows(sel, values, grad_out, sel.bags)
        return grad_values, grad_W_dec, None


def decode_sparse(values: torch.Tensor, W_dec: torch.Tensor, sel: Selection) -> torch.Tensor:
    """(n_bags, d_model) sums of the selected decoder rows weighted by `values` (no b_dec)."""
    return _DecodeSparse.apply(values, W_dec, sel)
