"""The PNG grids a run and `benchmarks/compare_runs.py` write: every row's name stays beside its own row."""

import torch

from pipeline.images import grid_figure


def test_long_row_names_stay_inside_their_rows():
    # compare_runs labels a row "<run label>\n<steps> steps": a rotated long name ran over the rows above and below
    from benchmarks.compare_runs import steps_label

    names = [steps_label("teacher", 32), steps_label("adversarial lr 1e-5 (shipped)", 1), "MSE-only lr 3e-5 1",
             "student 8"]
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


def test_empty_and_multi_line_row_names_are_drawn(tmp_path):
    from pipeline.images import save_grid

    rows = [torch.zeros(2, 3, 8, 8) for _ in range(3)]
    save_grid(rows, tmp_path / "blank.png", ["", "", ""])  # no names to draw: no margin, no error
    fig, axes = grid_figure(rows, ["", "teacher\n32 steps", "a very long name with many words in it"])
    assert axes[1][0].yaxis.label.get_text() == "teacher\n32 steps"  # its own line break kept
    assert all(len(line) <= 16 for line in axes[2][0].yaxis.label.get_text().splitlines())
    assert (tmp_path / "blank.png").stat().st_size > 0
