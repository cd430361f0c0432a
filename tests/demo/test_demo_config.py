"""DemoConfig checks its own values (one clear error naming the option)."""

import pytest

from traitscope.demo.pipeline import DemoConfig
from traitscope.errors import TraitscopeError


def test_the_defaults_are_valid_and_score_the_largest_k():
    DemoConfig().validate()
    assert DemoConfig().scored_k == 32 and DemoConfig(ks=(8,)).scored_k == 8
    assert DemoConfig(ks=(32, 8, 16), align_k=16).scored_k == 16


@pytest.mark.parametrize("changes, needle", [
    ({"n_images": 5}, "--n-images"), ({"val_frac": 1.0}, "--val-frac"), ({"ks": ()}, "--ks"),
    ({"ks": (8, 0)}, "--ks"), ({"tokens": 0}, "--tokens"), ({"batch_size": 0}, "--batch-size"),
    ({"variant": "relu"}, "--variant must be one of topk, batchtopk, matryoshka"),
    ({"align_k": 12}, "--align-k 12 is not one of --ks 8,16,32"), ({"l1": 0.0}, "--l1 must be positive"),
])
def test_an_impossible_setting_is_refused_by_name(changes, needle):
    with pytest.raises(TraitscopeError, match=needle):
        DemoConfig(**changes).validate()
