"""Archetypal SAE (Fel et al. 2025, the relaxed "RA-SAE"): decoder atoms kept near the data's convex hull.

A TopK SAE (AuxK included) whose dictionary is, during training,

    W_dec[i] = w_i · C + Λ_i,   w_i = softmax(logits_i),   ‖Λ_i‖ ≤ δ

with C (n_anchors, d_model) fixed points of the data: k-means centroids of the trainer's start-up
sample, taken relative to the starting decoder bias (the origin the SAE decodes from). Each atom is a
convex mix of data points, moved at most δ off their hull; only the logits and Λ are learnt. Training
tokens have unit mean squared norm, so δ is in units of a typical token's norm.

The constraint exists only in training (`torch.nn.utils.parametrize` on W_dec, registered by
`training_form_`; checkpoints hold its logits, Λ and C). Folding the input scale materialises the
dictionary, so a saved archetypal SAE is a plain one (W_enc, b_enc, W_dec, b_dec) that inference,
alignment and the app read like a TopK SAE. Its decoder rows keep the norms they were trained with:
unlike ReLU codes, a TopK selection would change if latents were rescaled to unit rows.
"""

import dataclasses

import numpy as np
import torch
from torch.nn.utils import parametrize

from traitscope.errors import TraitscopeError
from traitscope.sae.base import ForwardOutput, register
from traitscope.sae.topk import TopKParams, TopKSAE

MAX_DEFAULT_ANCHORS = 4096
"""The default n_anchors is d_sae up to this: the logits are (d_sae, n_anchors)."""
INIT_WEIGHT = 0.75
"""Share of its softmax weight an atom starts with on its own anchor (the rest spread over the others)."""
KMEANS_EPOCHS = 3
"""Passes of k-means over the start-up sample (MiniBatchKMeans' max_iter): the start-up took 19 s for 3072
centroids of CamVid's 65,536 sample tokens on 2 busy CPU cores."""


@dataclasses.dataclass
class ArchetypalParams(TopKParams):
    n_anchors: int | None = None
    """Data points (k-means centroids) whose convex hull holds the decoder atoms (default
    d_sae, at most 4096; at most the start-up sample's 65,536 tokens)."""
    delta: float = 0.1
    """How far an atom may leave the hull, in units of a typical token's norm (0: none)."""

    def resolved(self, d_model: int, d_sae: int) -> "ArchetypalParams":
        params = super().resolved(d_model, d_sae)
        n_anchors = min(d_sae, MAX_DEFAULT_ANCHORS) if self.n_anchors is None else self.n_anchors
        if n_anchors < 1:
            raise TraitscopeError(f"n_anchors must be >= 1, not {n_anchors}")
        if not self.delta >= 0:
            raise TraitscopeError(f"delta must be >= 0, not {self.delta}")
        return dataclasses.replace(params, n_anchors=n_anchors)


class HullDictionary(torch.nn.Module):
    """The parametrisation of W_dec: (logits, Λ) ↦ softmax(logits) · C + Λ."""

    def __init__(self, n_anchors: int, d_model: int):
        super().__init__()
        self.register_buffer("anchors_nd", torch.zeros(n_anchors, d_model))

    def forward(self, logits_sn: torch.Tensor, relax_sd: torch.Tensor) -> torch.Tensor:
        return logits_sn.softmax(1) @ self.anchors_nd + relax_sd

    def right_inverse(self, W_dec_sd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The learnt tensors at registration: zeros, set from the data by `ArchetypalSAE.init_from_data_`."""
        return W_dec_sd.new_zeros(W_dec_sd.shape[0], len(self.anchors_nd)), torch.zeros_like(W_dec_sd)


@register
class ArchetypalSAE(TopKSAE):
    variant = "archetypal"
    Params = ArchetypalParams
    unit_norm_decoder = False  # rows are convex mixes (+ Λ), not unit vectors, in training and once saved

    @property
    def trains_hull(self) -> bool:
        """Whether W_dec is the training parametrisation (else a plain, saved dictionary)."""
        return parametrize.is_parametrized(self, "W_dec")

    @property
    def hull(self) -> HullDictionary:
        return self.parametrizations.W_dec[0]

    @property
    def logits_sn(self) -> torch.nn.Parameter:
        return self.parametrizations.W_dec.original0

    @property
    def relax_sd(self) -> torch.nn.Parameter:
        """Λ, each row of norm at most δ."""
        return self.parametrizations.W_dec.original1

    # --- training ---
    def training_form_(self) -> None:
        if not self.trains_hull:
            hull = HullDictionary(self.params.n_anchors, self.d_model).to(self.W_dec.device)
            parametrize.register_parametrization(self, "W_dec", hull)

    @torch.no_grad()
    def init_from_data_(self, sample_nd: torch.Tensor) -> None:
        """C: k-means centroids of the sample (relative to b_dec); each atom starts near one centroid
        (taken in a random order, cycled when d_sae > n_anchors)."""
        from sklearn.cluster import MiniBatchKMeans  # here: scikit-learn takes 2 s to import, and only this SAE needs it

        n_anchors = self.params.n_anchors
        if len(sample_nd) < n_anchors:
            raise TraitscopeError(f"archetypal SAE: n_anchors={n_anchors} needs as many start-up tokens, the "
                                  f"sample has {len(sample_nd)}; lower --n-anchors")
        xc_nd = (sample_nd - self.b_dec).float().cpu().numpy()
        rng = np.random.default_rng(0)
        kmeans = MiniBatchKMeans(n_anchors, init=xc_nd[np.sort(rng.choice(len(xc_nd), n_anchors, replace=False))],
                                 n_init=1, max_iter=KMEANS_EPOCHS, batch_size=max(4096, n_anchors),
                                 compute_labels=False, random_state=0).fit(xc_nd)
        self.hull.anchors_nd.copy_(torch.from_numpy(kmeans.cluster_centers_))
        own_n = torch.randperm(n_anchors, device=self.b_dec.device).repeat(-(-self.d_sae // n_anchors))[:self.d_sae]
        bump = np.log(INIT_WEIGHT / (1 - INIT_WEIGHT) * max(n_anchors - 1, 1))  # softmax weight INIT_WEIGHT on it
        self.logits_sn.zero_().scatter_(1, own_n[:, None], bump)
        self.logits_sn.add_(torch.randn_like(self.logits_sn), alpha=0.1)  # atoms that share an anchor differ
        self.relax_sd.zero_()
        # The encoder starts on the atoms' directions, over k: the k atoms a token first picks are nearly
        # parallel (neighbouring centroids), and at full scale they would add up to about k times the token.
        atoms_sd = self.W_dec
        self.W_enc.copy_((atoms_sd / atoms_sd.norm(dim=1, keepdim=True).clamp_min(1e-12)).T / self.params.k)

    def forward(self, x_bd: torch.Tensor, dead_s: torch.Tensor | None = None, progress: float = 1.0) -> ForwardOutput:
        with parametrize.cached():  # W_dec = w·C + Λ computed once a step, not at every use
            return super().forward(x_bd, dead_s, progress)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Bring each Λ_i back to norm δ after an optimiser step (the softmax keeps w_i on the simplex)."""
        if self.trains_hull:
            norms_s1 = self.relax_sd.norm(dim=1, keepdim=True)
            self.relax_sd.mul_((self.params.delta / norms_s1.clamp_min(1e-12)).clamp_max(1.0))

    # --- the saved SAE ---
    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """The dictionary is materialised first (C and Λ are in training units), then folded like any
        SAE's: the result is a plain dictionary with the same decoder rows."""
        if self.trains_hull:
            parametrize.remove_parametrizations(self, "W_dec", leave_parametrized=True)
        super().fold_input_scale_(scale)

    def unit_decoder_rows_(self) -> None:
        """Left undone: TopK compares pre-activations across latents, so rescaling latents would change
        which k a token keeps. A saved archetypal SAE keeps its atoms' norms (those of w·C + Λ)."""
