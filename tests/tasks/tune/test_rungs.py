"""tune.min_resource=auto: the successive-halving rungs chosen from the epoch budget."""

import pytest

from tuneline.core.config.base import ConfigError
from tuneline.core.config.params import build_params
from tuneline.tasks.tune.study import _pruner, min_resource, rung_epochs


def tune(**overrides):
    return build_params({}, {f"tune.{k}": v for k, v in overrides.items()}).tune


@pytest.mark.fast
@pytest.mark.parametrize("epochs, factor, first, rungs", [
    (2, 3, 1, [1]),         # the default budget: judged after epoch 1, the kept third runs epoch 2
    (4, 3, 1, [1, 3]),
    (9, 3, 1, [1, 3]),      # rungs 1, 3 and the end, 9
    (20, 3, 2, [2, 6, 18]),
    (27, 3, 3, [3, 9]),     # not after one noisy epoch of 27
    (16, 2, 4, [4, 8]),
])
def test_auto_fits_three_rungs_in_the_epoch_budget(epochs, factor, first, rungs):
    cfg = tune(epochs=epochs, reduction_factor=factor)
    assert cfg.min_resource == "auto"
    assert min_resource(cfg) == first and rung_epochs(cfg) == rungs
    assert _pruner(tune(epochs=epochs, reduction_factor=factor, pruner="asha"))._min_resource == first


@pytest.mark.fast
def test_an_explicit_min_resource_wins_and_a_bad_one_is_refused():
    assert min_resource(tune(epochs=27, min_resource=1)) == 1
    with pytest.raises(ConfigError, match="min_resource"):
        tune(min_resource=0)
    with pytest.raises(ConfigError, match="min_resource"):
        tune(min_resource="sometimes")
