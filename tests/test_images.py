"""The PNG grids a run and `benchmarks/compare_runs.py` write: every row's name stays beside its own row."""

import torch

from pipeline.images import grid_figure


def test_long_row_names_stay_inside_their_rows():
    # compare_runs labels a row "<run label> <steps>": a rotated long name ran over the rows above and below
    names = ["teacher 32", "adversarial lr 1e-5 (shipped) 1", "MSE-only lr 3e-5 1", "student 8"]
    rows = [torch.rand(10, 3, 32, 32) * 2 - 1 for _ in names]
    fig, axes = grid_figure(rows, names, col_labels=[str(i) for i in range(10)])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for i, name in enumerate(names):
        row = axes[i][0].get_window_extent(renderer)
        label = axes[i][0].yaxis.label.get_window_extent(renderer)
        assert label.y0 >= row.y0 - 1 and label.y1 <= row.y1 + 1, f"{name!r} runs out of its row"
        assert label.x0 >= 0, f"{name!r} is cut off at the left edge"
        assert label.x1 <= row.x0, f"{name!r} overlaps its row's first image"
