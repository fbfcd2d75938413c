"""Every public entry point's ``Example:`` runs (doctests of the installed package)."""

import doctest

import pytest
import torch

import pml_ms_plus
from pml_ms_plus import functional, miners
from pml_ms_plus.ablation import distributed
from pml_ms_plus.losses import adaptive, gathered, memory, ms, problem

MODULES = [functional, miners, ms, adaptive, memory, gathered, problem, distributed]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_examples_run(module):
    globs = {"torch": torch, **{name: getattr(module, name) for name in dir(module)}}
    globs.update(MSLoss=pml_ms_plus.losses.MSLoss, AdaptiveMSLoss=pml_ms_plus.losses.AdaptiveMSLoss)
    result = doctest.testmod(module, globs=globs, optionflags=doctest.NORMALIZE_WHITESPACE, report=True)
    assert result.attempted > 0, f"{module.__name__} has no example"
    assert result.failed == 0


def test_functional_public_edge():
    assert set(functional.__all__) >= {
        "pair_masks",
        "ms_terms",
        "ms_anchor_losses",
        "pair_weights",
        "multi_similarity_loss",
    }
    for name in functional.__all__:
        assert getattr(functional, name).__doc__, name
