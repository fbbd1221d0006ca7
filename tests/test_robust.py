"""Robust aggregation rules, the server's check of uploads, and injected attacks."""

import json
import os
import re

import numpy as np
import pytest
import torch
from scipy import stats

from fedlease.fl import ConfigError, from_dict
from fedlease.fl.faults import AttackPlan
from fedlease.fl.robust import Aggregation, multi_krum, norm_outliers, validate_upload
from fedlease.fl.simulator import run
from fedlease.fl.strategies.base import weighted_mean


def uploads(n, seed=0, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(shape, generator=g), "b": torch.randn(7, generator=g)}
            for _ in range(n)]  # fmt: skip


def test_mean_is_the_weighted_mean_bit_for_bit():
    ups, w = uploads(5), [3.0, 1.0, 2.0, 5.0, 4.0]
    got, want = Aggregation.from_config("mean")(ups, w), weighted_mean(ups, w)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert Aggregation.from_config(None) == Aggregation.from_config("mean")


@pytest.mark.parametrize("n", [4, 5])
def test_median_and_trimmed_mean_match_numpy_and_scipy(n):
    ups = uploads(n, seed=n)
    stacked = {k: np.stack([u[k].numpy() for u in ups]) for k in ups[0]}
    med = Aggregation.from_config("median")(ups, [1.0] * n)
    trim = Aggregation.from_config({"rule": "trimmed_mean", "trim": 0.25})(ups, [1.0] * n)
    for k, s in stacked.items():
        np.testing.assert_allclose(med[k].numpy(), np.median(s, axis=0), rtol=1e-6)
        np.testing.assert_allclose(trim[k].numpy(), stats.trim_mean(s, 0.25, axis=0), rtol=1e-6)
        assert med[k].dtype == torch.float32


def test_norm_clip_bounds_an_outliers_pull():
    honest = uploads(4, seed=1)
    attacked = honest[:3] + [{k: v * 100 for k, v in honest[3].items()}]
    w = [1.0] * 4
    mean = Aggregation.from_config("mean")(attacked, w)
    clipped = Aggregation.from_config("norm_clip")(attacked, w)
    clean = Aggregation.from_config("mean")(honest, w)

    def dist(x, y):
        return sum(float((x[k] - y[k]).norm() ** 2) for k in x) ** 0.5

    spread = max(dist(u, clean) for u in honest)
    assert dist(mean, clean) > 10 * spread  # the plain mean follows the outlier
    assert dist(clipped, clean) < 2 * spread  # the clipped one moves by about the spread


@pytest.mark.parametrize("n,f", [(5, 1), (6, 2), (7, 1), (3, 1)])
def test_multi_krum_keeps_the_uploads_a_direct_computation_picks(n, f):
    ups = uploads(n, seed=10 * n + f)
    flat = np.stack([np.concatenate([u[k].numpy().ravel() for k in u]) for u in ups]).astype(float)
    scores = []
    for i in range(n):
        d = sorted(float(((flat[i] - flat[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d[: max(1, n - f - 2)]))
    want = sorted(np.argsort(scores, kind="stable")[: n - f].tolist())
    assert multi_krum(ups, f) == want
    w = [float(i + 1) for i in range(n)]
    got = Aggregation.from_config({"rule": "krum", "byzantine": f})(ups, w)
    kept = [ups[i] for i in want]
    expect = weighted_mean(kept, [w[i] for i in want])
    for k in got:
        torch.testing.assert_close(got[k], expect[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("attack", ["sign_flip", "scale"])
def test_krum_leaves_out_a_tampered_upload_whole(attack):
    """Four clients from one start, similar updates; client 3 flips or scales its update: Multi-
    Krum drops it and returns the honest clients' mean (where the median is biased)."""
    g = torch.Generator().manual_seed(3)
    start = {"a": torch.randn(4, 6, generator=g)}
    common = torch.randn(4, 6, generator=g)
    new = [{"a": start["a"] + common + 0.3 * torch.randn(4, 6, generator=g)} for _ in range(4)]
    bad = AttackPlan(clients=(3,), kind=attack, factor=1.0 if attack == "sign_flip" else 100.0)
    ups = new[:3] + [bad.tamper(start, new[3], 0, 3)]
    w = [1.0, 2.0, 1.0, 1.0]
    assert multi_krum(ups, 1) == [0, 1, 2]
    got = Aggregation.from_config("krum")(ups, w)
    torch.testing.assert_close(got["a"], weighted_mean(new[:3], w[:3])["a"])
    two = Aggregation.from_config("krum")(ups[:2], w[:2])  # nothing to compare: the mean
    torch.testing.assert_close(two["a"], weighted_mean(ups[:2], w[:2])["a"])


def test_bad_aggregation_settings_name_the_key():
    for value, pattern in [("mode", "'aggregation.rule' = 'mode'"),
                           ({"rule": "trimmed_mean", "trim": 0.5}, "'aggregation.trim' = 0.5"),
                           ({"rule": "norm_clip", "clip": 0}, "'aggregation.clip' = 0"),
                           ({"rule": "krum", "byzantine": -1}, "'aggregation.byzantine' = -1"),
                           ({"rule": "median", "beta": 1}, "unknown config key 'aggregation.beta'"),
                           ({"trim": "a lot"}, "'aggregation.trim' must be float")]:  # fmt: skip
        with pytest.raises(ConfigError, match=pattern):
            from_dict({"clients": ["sst2", "mrpc", "rte"], "aggregation": value})


def test_upload_checks_name_the_tensor_and_the_fault():
    expected = uploads(1)[0]
    assert validate_upload(expected, {k: v.clone() for k, v in expected.items()}) is None
    cases = [
        ({"a": expected["a"]}, "wrong tensors: missing \\['b'\\]"),
        ({**expected, "c": expected["b"]}, "unexpected \\['c'\\]"),
        ({**expected, "a": expected["a"][:-1]}, "a: shape \\(2, 5\\), expected \\(3, 5\\)"),
        ({**expected, "b": expected["b"].double()}, "b: dtype float64, expected float32"),
        ({**expected, "b": expected["b"] * float("nan")}, "non-finite values in \\['b'\\]"),
    ]
    for upload, pattern in cases:
        assert validate_upload(expected, upload) is not None
        assert re.search(pattern, validate_upload(expected, upload))


def test_norm_bound_rejects_only_the_oversized_upload_of_its_group():
    ups = dict(enumerate(uploads(6, seed=3)))
    ups[2] = {k: v * 50 for k, v in ups[2].items()}
    groups = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    out = norm_outliers(ups, groups, 10.0)
    assert list(out) == [2] and "x the median" in out[2]
    assert norm_outliers(ups, groups, None) == {}


def test_attacks_tamper_with_the_update_not_the_start():
    start = {"w": torch.ones(2, 3)}
    new = {"w": torch.ones(2, 3) + 0.1}
    scale = AttackPlan.from_config({"clients": [0], "kind": "scale", "factor": 100})
    flip = AttackPlan.from_config({"clients": [0], "kind": "sign_flip", "factor": 1})
    assert torch.allclose(scale.tamper(start, new, 0, 0)["w"], torch.full((2, 3), 11.0))
    assert torch.allclose(flip.tamper(start, new, 0, 0)["w"], torch.full((2, 3), 0.9))
    assert scale.hits(0, 0) and not scale.hits(0, 1)
    late = AttackPlan.from_config({"clients": [0], "from_round": 2})
    assert not late.hits(1, 0) and late.hits(2, 0)
    shape = AttackPlan.from_config({"clients": [0], "kind": "wrong_shape"}).malform(new)
    assert shape["w"].shape == (1, 3)
    for bad, pattern in [({"kind": "bribe"}, "'attacks.kind' = 'bribe'"),
                         ({"clients": [9]}, "'attacks.clients' holds 9"),
                         ({"volume": 3}, "unknown config key 'attacks.volume'")]:  # fmt: skip
        with pytest.raises(ConfigError, match=pattern):
            from_dict({"clients": ["sst2", "mrpc", "rte"], "attacks": bad})


needs_data = pytest.mark.skipif(not os.environ.get("FEDLEASE_DATA_DIR"),
                                reason="FEDLEASE_DATA_DIR not set")  # fmt: skip
TINY = {"clients": ["sst2"] * 4, "precision": "fp32", "train_samples": 16, "test_samples": 8,
        "warmup_rounds": 1,
        "rounds": 2, "local_epochs": 1, "max_seq_len": 24, "max_experts": 2, "threads": 1,
        "seed": 4}  # fmt: skip


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("method,kind", [("fedlease", "wrong_shape"), ("fedlease", "wrong_dtype"),
                                         ("fedit", "wrong_dtype"), ("fedit", "scale")])  # fmt: skip
def test_bad_uploads_are_rejected_with_their_reason_and_the_run_goes_on(kind, method, tmp_path):
    """(The norm bound judges groups of 3 or more: FedIT's one group of 4 here.)"""
    cfg = {**TINY, "method": method, "max_norm_ratio": 10.0,
           "attacks": {"clients": [1], "kind": kind, "factor": 1000.0}}  # fmt: skip
    with pytest.warns(UserWarning, match="rejected client 1's upload"):
        summary = run(from_dict(cfg), tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    uploading = [r for r in rows if not (method == "fedlease" and r["phase"] == "warmup")]
    assert uploading and summary.rounds == 3
    want = {"wrong_shape": "shape", "wrong_dtype": "dtype float64", "scale": "x the median"}[kind]
    for row in uploading:
        assert row["rejected"] == [1]
        status = row["clients"][1]
        assert status["status"] == "rejected" and want in status["reason"]
        assert all(c["status"] == "ok" for c in row["clients"] if c["client"] != 1)
