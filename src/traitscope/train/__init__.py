"""SAE training: many SAEs in one pass over stored activations (`traitscope train`)."""

from traitscope.train.config import RunSettings, TrainConfig
from traitscope.train.trainer import RunResult, train

__all__ = ["RunResult", "RunSettings", "TrainConfig", "train"]
