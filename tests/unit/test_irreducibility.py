"""Irreducibility indices on synthetic clouds: a circle is irreducible, a mixture of two lines and a
separable (independent) cloud are reducible."""
from __future__ import annotations

import pytest
import torch

from interpkit.analyses.circles.irreducibility import (epsilon_mixture_index, irreducibility, mutual_information, separability_index,
                                     synthetic_cloud)



@pytest.fixture(scope="module")
def indices():
    return {k: irreducibility(synthetic_cloud(k, n=800, seed=1)) for k in ("circle", "two_lines", "gaussian", "square")}


def test_circle_is_irreducible(indices):
    c = indices["circle"]
    assert c.irreducible()
    assert c.mixture < 0.3 and c.separability > 0.8


def test_mixture_of_two_lines_is_reducible(indices):
    m = indices["two_lines"]
    assert m.mixture > 0.45                        # half the points sit on each axis
    assert not m.irreducible()
    assert m.mixture > indices["circle"].mixture + 0.2


def test_independent_clouds_are_separable(indices):
    for kind in ("gaussian", "square"):
        assert indices[kind].separability < 0.15, kind
        assert not indices[kind].irreducible()
    assert indices["circle"].separability > 5 * indices["gaussian"].separability


def test_indices_are_invariant_and_deterministic():
    x = synthetic_cloud("two_lines", n=600, seed=2)
    rot = torch.linalg.qr(torch.randn(2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    moved = 3.0 * x @ rot + torch.tensor([5.0, -2.0], dtype=torch.float64)
    assert abs(epsilon_mixture_index(x) - epsilon_mixture_index(moved)) < 0.03
    assert abs(separability_index(x) - separability_index(moved)) < 0.05
    assert epsilon_mixture_index(x) == epsilon_mixture_index(x)


def test_mixture_index_in_higher_dimension_by_gradient_ascent():
    g = torch.Generator().manual_seed(0)
    n = 240
    plane = torch.randn(n, 3, generator=g, dtype=torch.float64)
    plane[: n // 2, 2] = 0.0                      # half the points on the plane z = 0
    assert epsilon_mixture_index(plane, steps=150) > 0.45
    ball = torch.randn(n, 3, generator=g, dtype=torch.float64)
    assert epsilon_mixture_index(ball, steps=150) < 0.2


def test_mutual_information_basics():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(5000, generator=g), torch.rand(5000, generator=g)
    assert mutual_information(a, b) < 0.05
    assert mutual_information(a, a) > 3.0          # log2(10) bits for 10 bins
