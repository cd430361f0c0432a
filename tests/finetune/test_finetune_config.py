"""FinetuneConfig, AugmentConfig and GridsConfig check their own values (one clear error naming the option)."""

import pytest

from traitscope.errors import TraitscopeError
from traitscope.finetune.augment import AugmentConfig
from traitscope.finetune.grids_cli import GridsConfig
from traitscope.finetune.trainer import FinetuneConfig


def test_the_defaults_are_valid():
    FinetuneConfig().validate()


@pytest.mark.parametrize("changes, needle", [
    ({"epochs": -1}, "--epochs"), ({"batch_size": 1}, "--batch-size"), ({"lr": 0}, "--lr"),
    ({"temperature": -1}, "--temperature"), ({"save_every": 0}, "--save-every"), ({"head_dim": -1}, "--head-dim"),
    ({"image_size": 16}, "--image-size"), ({"batchnorm": "sometimes"}, "--batchnorm"),
    ({"augment": AugmentConfig(min_scale=0)}, "--min-scale"), ({"augment": AugmentConfig(jitter=2)}, "--jitter"),
    ({"augment": AugmentConfig(p_gray=1.5)}, "--p-gray"), ({"augment": AugmentConfig(p_hflip=-0.1)}, "--p-hflip"),
])
def test_an_impossible_setting_is_refused_by_name(changes, needle):
    with pytest.raises(TraitscopeError, match=needle):
        FinetuneConfig(**changes).validate()


@pytest.mark.parametrize("changes, needle", [({"n": 0}, "--n"), ({"cell": 4}, "--cell"), ({"limit": -1}, "--limit")])
def test_grids_refuses_an_impossible_setting_by_name(changes, needle):
    GridsConfig(shards="S", out="O").validate()
    with pytest.raises(TraitscopeError, match=needle):
        GridsConfig(shards="S", out="O", **changes).validate()
