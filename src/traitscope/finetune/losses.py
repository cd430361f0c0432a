"""The two fine-tuning losses of the faces workflow, as plain functions of embeddings.

Contrastive (InfoNCE on two views): each image is augmented twice; row i of the similarity matrix
between view-1 and view-2 embeddings should peak at column i (its own other view), so the model must
tell the images of a batch apart while ignoring the augmentations. The single-view form
(logits = e·eᵀ against the diagonal) is satisfied by any embedding, since every vector is most similar
to itself; that is why two views are used.

Orientation: MSE(e(x), −e(rot180(x))), i.e. an upside-down image should map to the opposite
embedding, so the embedding also encodes which way up a face is.
"""

import torch
import torch.nn.functional as F


def l2_normalize(e_bd: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each row divided by its Euclidean norm (rows of zeros stay zero)."""
    return e_bd / e_bd.norm(dim=-1, keepdim=True).clamp_min(eps)


def contrastive_loss(e1_bd: torch.Tensor, e2_bd: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric in-batch cross-entropy of cosine-similarity logits between two views.

    logits[i, j] = cos(e1[i], e2[j]) / temperature; the target of row i is column i, and the loss is
    the mean of the row-wise (view 1 → view 2) and column-wise (view 2 → view 1) cross-entropies.
    A batch of B images has chance level log(B).
    """
    logits_bb = l2_normalize(e1_bd) @ l2_normalize(e2_bd).T / temperature
    target_b = torch.arange(len(logits_bb), device=logits_bb.device)
    return 0.5 * (F.cross_entropy(logits_bb, target_b) + F.cross_entropy(logits_bb.T, target_b))


def orientation_loss(e_bd: torch.Tensor, e_rot_bd: torch.Tensor) -> torch.Tensor:
    """MSE(e(x), −e(rot180(x))): the squared error ‖e + e_rot‖² of each image, averaged over the batch.

    The error is summed over dimensions (not averaged), so the loss does not shrink with the embedding
    width: for L2-normalised embeddings it is 2 + 2·cos(e, e_rot), from 4 (same direction) to 0.
    """
    return (e_bd + e_rot_bd).pow(2).sum(dim=-1).mean()


def rot180(pixels_bchw: torch.Tensor) -> torch.Tensor:
    """Each image turned upside down (rotated by 180 degrees in the image plane)."""
    return torch.flip(pixels_bchw, dims=(-2, -1))
