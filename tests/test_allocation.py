"""Client distances from B matrices, clustering with silhouette-chosen K, expert averaging."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from fedlease.fl import allocate, b_distance_matrix, cluster, init_experts
from fedlease.fl.allocation import average
from fedlease.fl.strategies import aggregate_clusters


def fake_states(groups, layers=3, noise=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = {c: [torch.randn(1, 8, 2, generator=g) for _ in range(layers)] for c in set(groups)}
    states = []
    for c in groups:
        s = {}
        for layer in range(layers):
            for mod in ("query", "value"):
                b = centres[c][layer] + noise * torch.randn(1, 8, 2, generator=g)
                s[f"l{layer}.{mod}.lora_B"] = b
                s[f"l{layer}.{mod}.lora_A"] = torch.randn(1, 2, 6, generator=g)
        s["classifier.weight"] = torch.randn(2, 6, generator=g)
        states.append(s)
    return states


def test_distance_is_mean_of_per_layer_cosine_distances():
    states = fake_states([0, 0, 1])
    d = b_distance_matrix(states)
    keys = [k for k in states[0] if k.endswith("lora_B")]
    i, j = 0, 2
    want = np.mean(
        [
            1
            - torch.nn.functional.cosine_similarity(
                states[i][k].flatten(), states[j][k].flatten(), dim=0
            ).item()
            for k in keys
        ]
    )
    assert d[i, j] == pytest.approx(want, rel=1e-6)
    assert np.allclose(d, d.T) and np.all(np.diag(d) == 0)
    # A and heads do not matter
    for s in states:
        s["classifier.weight"] *= -1
        for k in s:
            if k.endswith("lora_A"):
                s[k] = torch.randn_like(s[k])
    assert np.allclose(b_distance_matrix(states), d)


@pytest.mark.parametrize("groups", [[0, 0, 1, 1], [0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 2, 2, 2]])
def test_silhouette_recovers_groups(groups):
    alloc = allocate(b_distance_matrix(fake_states(groups)), max_experts=4)
    assert alloc.num_experts == len(set(groups))
    assert adjusted_rand_score(groups, alloc.assignment) == 1.0
    assert alloc.assignment[0] == 0  # clusters are numbered by first appearance
    assert set(alloc.silhouette) == set(range(2, min(4, len(groups) - 1) + 1))


def test_fixed_k_and_edge_cases():
    d = b_distance_matrix(fake_states([0, 0, 1, 1, 2]))
    fixed = allocate(d, max_experts=4, num_experts=2)
    assert fixed.num_experts == 2 and fixed.silhouette == {}
    assert cluster(d, 1) == [0] * 5 and cluster(d, 5) == [0, 1, 2, 3, 4]


def test_init_experts_weighted_average():
    states = fake_states([0, 1, 0])
    experts = init_experts(states, [0, 1, 0], weights=[1.0, 5.0, 3.0])
    key = "l1.value.lora_B"
    assert experts[key].shape == (2, 8, 2)
    torch.testing.assert_close(experts[key][0], (states[0][key][0] + 3 * states[2][key][0]) / 4)
    torch.testing.assert_close(experts[key][1], states[1][key][0])
    assert "classifier.weight" not in experts


def _uploads(n):
    return {
        i: {
            "q.lora_A": torch.full((2, 3), float(i)),
            "q.lora_B": torch.full((3, 2), 10.0 * i),
            "q.router": torch.full((3, 3), float(i)),
        }
        for i in range(n)
    }


def test_aggregation_per_cluster_weighted_by_samples():
    experts = {"q.lora_A": torch.zeros(2, 2, 3), "q.lora_B": torch.zeros(2, 3, 2)}
    routers = [{"q.router": torch.zeros(3, 3)} for _ in range(2)]
    new, new_routers = aggregate_clusters(
        experts, routers, _uploads(3), [0, 1, 0], [100.0, 50.0, 300.0]
    )
    torch.testing.assert_close(new["q.lora_A"][0], torch.full((2, 3), 1.5))  # (0*100 + 2*300)/400
    torch.testing.assert_close(new["q.lora_B"][1], torch.full((3, 2), 10.0))
    torch.testing.assert_close(new_routers[0]["q.router"], torch.full((3, 3), 1.5))
    torch.testing.assert_close(new_routers[1]["q.router"], torch.full((3, 3), 1.0))
    assert torch.all(experts["q.lora_A"] == 0)  # inputs untouched


def test_aggregation_skips_missing_clients_and_keeps_empty_clusters():
    experts = {"q.lora_A": torch.ones(2, 2, 3) * 7, "q.lora_B": torch.ones(2, 3, 2) * 7}
    routers = [{"q.router": torch.full((3, 3), -1.0)}, {"q.router": torch.full((3, 3), -2.0)}]
    ups = _uploads(3)
    del ups[1]  # the only member of cluster 1 failed
    del ups[0]  # one member of cluster 0 was rejected
    new, new_routers = aggregate_clusters(experts, routers, ups, [0, 1, 0], [100.0, 50.0, 300.0])
    torch.testing.assert_close(new["q.lora_A"][0], torch.full((2, 3), 2.0))  # client 2 alone
    torch.testing.assert_close(new["q.lora_A"][1], torch.full((2, 3), 7.0))  # kept
    assert new_routers[1] is routers[1]


def test_average_is_weighted():
    torch.testing.assert_close(
        average([torch.ones(2), torch.zeros(2)], [3, 1]), torch.full((2,), 0.75)
    )
