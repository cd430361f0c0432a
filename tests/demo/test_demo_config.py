"""DemoConfig checks its own values (one clear error naming the option)."""

import pytest

from traitscope.demo.pipeline import DemoConfig
from traitscope.errors import TraitscopeError


def test_the_defaults_are_valid():
    DemoConfig().validate()


@pytest.mark.parametrize("changes, needle", [
    ({"n_images": 5}, "--n-images"), ({"val_frac": 1.0}, "--val-frac"), ({"ks": ()}, "--ks"),
    ({"ks": (8, 0)}, "--ks"), ({"tokens": 0}, "--tokens"), ({"batch_size": 0}, "--batch-size"),
])
def test_an_impossible_setting_is_refused_by_name(changes, needle):
    with pytest.raises(TraitscopeError, match=needle):
        DemoConfig(**changes).validate()
