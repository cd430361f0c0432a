"""Random views of images for the contrastive loss, drawn from an explicit generator.

Every random choice comes from a `torch.Generator` the trainer seeds from (seed, step), so a resumed
run draws exactly the views an uninterrupted one would have. Views never flip or rotate an image
upside down: which way up a face is must stay visible to the orientation loss.
"""

from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF

from traitscope.errors import TraitscopeError


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of the augmentations that make two views of one image differ."""

    min_scale: float = 0.5
    """Random resized crop: smallest fraction of the image area kept."""
    jitter: float = 0.3
    """Brightness, contrast and saturation are each scaled by a factor in [1 - jitter, 1 + jitter]."""
    p_jitter: float = 0.8
    """Probability of colour jitter."""
    p_gray: float = 0.2
    """Probability of turning a view grey."""
    p_hflip: float = 0.5
    """Probability of a left-right mirror (faces are roughly symmetric; up-down is never flipped)."""

    def validate(self) -> None:
        """Raise TraitscopeError naming the first impossible setting."""
        if not 0 < self.min_scale <= 1:
            raise TraitscopeError(f"--min-scale must lie in (0, 1], not {self.min_scale:g}")
        if not 0 <= self.jitter <= 1:
            raise TraitscopeError(f"--jitter must lie in [0, 1], not {self.jitter:g}")
        for name in ("p_jitter", "p_gray", "p_hflip"):
            if not 0 <= getattr(self, name) <= 1:
                raise TraitscopeError(f"--{name.replace('_', '-')} is a probability, not {getattr(self, name):g}")


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def random_view(image_chw: torch.Tensor, g: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """One augmented view of a float image in [0, 1], of the same size."""
    _, height, width = image_chw.shape
    area = height * width
    # random resized crop: area fraction in [min_scale, 1], aspect ratio in [3/4, 4/3] (log-uniform)
    scale = _uniform(g, cfg.min_scale, 1.0)
    log_ratio = _uniform(g, -0.2877, 0.2877)
    ratio = float(torch.exp(torch.tensor(log_ratio)))
    crop_w = min(width, max(1, round((area * scale * ratio) ** 0.5)))
    crop_h = min(height, max(1, round((area * scale / ratio) ** 0.5)))
    top = int(torch.randint(0, height - crop_h + 1, (), generator=g))
    left = int(torch.randint(0, width - crop_w + 1, (), generator=g))
    view = TF.resized_crop(image_chw, top, left, crop_h, crop_w, [height, width], antialias=True)
    if _uniform(g, 0, 1) < cfg.p_hflip:
        view = TF.horizontal_flip(view)
    if _uniform(g, 0, 1) < cfg.p_jitter:
        low, high = 1 - cfg.jitter, 1 + cfg.jitter
        view = TF.adjust_brightness(view, _uniform(g, low, high))
        view = TF.adjust_contrast(view, _uniform(g, low, high))
        view = TF.adjust_saturation(view, _uniform(g, low, high))
    if _uniform(g, 0, 1) < cfg.p_gray:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    return view.clamp(0, 1)


def random_views(images_bchw: torch.Tensor, g: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """One independent view of each image of a batch."""
    return torch.stack([random_view(image, g, cfg) for image in images_bchw])
