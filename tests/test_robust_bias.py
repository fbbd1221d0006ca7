"""``studies/robust_bias.py``: the step each rule keeps and its distance to the honest mean."""

import pytest
import torch
from helpers import load_script


@pytest.fixture(scope="module")
def bias():
    return load_script("studies/robust_bias.py")  # it imports robustness.py beside it


def test_identical_honest_updates_give_the_known_values(bias):
    u = torch.randn(50, dtype=torch.float64) + 0.5
    m = bias.measure_round([u.clone() for _ in range(4)], [1.0] * 4, bias.RULES)
    cells = m["cells"]
    assert m["spread"] == pytest.approx(0.0, abs=1e-12)
    # (3u - u) / 4 = u / 2: half the step, half its length off, away from the attacker's u
    assert cells["sign flip x1|mean"] == pytest.approx((0.5, 0.5, -0.5))
    # (3u + 100u) / 4
    assert cells["scale x100|mean"] == pytest.approx((103 / 4, 99 / 4, 99 / 4))
    # the two middle values of {-u, u, u, u} per coordinate are both u
    assert cells["sign flip x100|median"] == pytest.approx((1.0, 0.0, 0.0), abs=1e-12)
    for attack in bias.ATTACKS:
        assert cells[f"{attack}|krum"] == pytest.approx((1.0, 0.0, 0.0), abs=1e-12)
    assert cells["none|mean"] == pytest.approx((1.0, 0.0, 0.0), abs=1e-12)


def test_noisy_honest_updates_pull_the_coordinate_rules_off(bias):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2000, generator=gen, dtype=torch.float64)
    ups = [h + torch.randn(2000, generator=gen, dtype=torch.float64) for _ in range(4)]
    m = bias.measure_round(ups, [1.0] * 4, bias.RULES)
    cells = m["cells"]
    # |n_i - mean n| / |h + mean n| = sqrt(2/3) / sqrt(4/3) for unit-variance h and noise
    assert m["spread"] == pytest.approx(0.5**0.5, rel=0.05)
    step, error, pull = cells["sign flip x1|median"]
    assert step < 0.95 and error > 0.2 and pull < -0.1
    assert cells["scale x100|median"][2] > 0.1
    # Multi-Krum leaves the flipped upload out whole: exactly the honest mean
    assert cells["sign flip x1|krum"] == pytest.approx((1.0, 0.0, 0.0), abs=1e-9)


def test_table_has_a_row_per_rule(bias):
    rows = [{"spread": 1.0, "cells": {f"{a}|{r}": (1.0, 0.0, 0.0) for a in bias.ATTACKS
                                      for r in bias.RULES}}]  # fmt: skip
    text = bias.table(rows)
    assert all(f"| {rule} |" in text for rule in bias.RULES)
    assert "1.00 / 0.00 / +0.00" in text
