"""The streaming merge asks each method for its streaming form; a method without one is refused."""

import pytest
import torch

from lightning_selmerge.merging import MergeError, TiesMerging, merge_state_dicts_streaming
from lightning_selmerge.merging.methods import ParameterSelection, WeightedAverage


def test_average_and_selection_offer_a_streaming_form():
    assert WeightedAverage().streaming() is not None
    assert ParameterSelection(resample=1).streaming() is not None


def test_a_method_without_a_streaming_form_is_refused_with_the_alternatives():
    states = [{"w": torch.randn(4)} for _ in range(2)]
    base = {"w": torch.zeros(4)}
    with pytest.raises(MergeError, match=r"no streaming form.*--streaming false"):
        merge_state_dicts_streaming(states, method=TiesMerging(), base=base)
