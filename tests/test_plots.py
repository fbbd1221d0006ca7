"""The per-client plots stay a bounded size for many clients (they once grew with the client
count: 1,000 clients asked matplotlib for a 54,000-pixel-square heatmap and ran out of memory)."""

import numpy as np
import pytest
from PIL import Image

from fedlease.fl.allocation import Allocation
from fedlease.fl.plots import MAX_INCHES, plot_dendrogram, plot_heatmap


@pytest.mark.parametrize("n", [6, 300])
def test_clustering_plots_are_bounded(tmp_path, n):
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(n, 3))
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    alloc = Allocation(3, [int(i % 3) for i in range(n)], {}, d)
    tasks = [("sst2", "qnli", "mrpc")[i % 3] for i in range(n)]
    plot_heatmap(tmp_path / "h.png", alloc, tasks)
    plot_dendrogram(tmp_path / "d.png", alloc, tasks)
    limit = (MAX_INCHES + 1.5) * 120
    for name in ("h.png", "d.png"):
        width, height = Image.open(tmp_path / name).size
        assert 100 < width <= limit and 100 < height <= limit, (name, width, height)
