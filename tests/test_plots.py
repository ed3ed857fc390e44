"""The report's figures: each writes one valid, non-trivial PNG, the same bytes for the same input, and empty
or inconsistent input raises a ValueError that says what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from rahf.plots import layer_strength, noise_sweep, reward_vs_temperature, training_curves, win_rate_bars

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

WIN_ROWS = [
    {"method": "sft", "win_rate": 0.41, "ci95": [0.33, 0.5]},
    {"method": "dpo", "win_rate": 0.62, "ci95": [0.53, 0.7]},
    {"method": "rahf-scit", "win_rate": 0.66, "ci95": [0.58, 0.73]},
    {"method": "rahf-dual", "win_rate": 0.58, "ci95": [0.49, 0.66]},
    {"method": "hir", "win_rate": 0.47, "ci95": [0.38, 0.56]},
]
CURVES = {"sft": {0.0: 1.2, 0.5: 1.0, 1.0: 0.4}, "rahf-scit": {1.0: 1.1, 0.0: 2.0, 0.5: 1.7}}
LAYER_STATS = {"rahf-scit": {8: 0.12, 10: 0.31, 12: 0.25}, "rahf-dual": {8: 0.08, 10: 0.2, 12: 0.22}}
HISTORIES = {
    "instruct": [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-4} for s in range(1, 11)]
    + [{"step": 10, "train_runtime": 1.5}],
    "align": [{"step": s, "loss": 1.0 / s, "grad_norm": 0.5 + s / 10} for s in range(1, 21)],
    "dpo": [{"step": s, "loss": 0.7 - s / 100} for s in range(5, 50, 5)],
    "reward": [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.6}],
}
NOISE = {
    "dpo": {0.0: (0.62, 0.55, 0.69), 0.1: (0.57, 0.5, 0.64), 0.3: (0.5, 0.42, 0.58)},
    "rahf-scit": {0.3: (0.58, 0.5, 0.66), 0.0: (0.66, 0.59, 0.73), 0.1: (0.63, 0.56, 0.7)},
}

CASES = {
    "win_rate_bars": lambda path: win_rate_bars(WIN_ROWS, path),
    "reward_vs_temperature": lambda path: reward_vs_temperature(CURVES, path),
    "layer_strength": lambda path: layer_strength(LAYER_STATS, path, ylabel="mean |v| / |o|"),
    "training_curves": lambda path: training_curves(HISTORIES, path),
    "training_curves_held_out": lambda path: training_curves(
        {"sft": [{"step": s, "loss": 2.0 / s} | ({"eval_loss": 2.5 / s} if s % 3 == 0 else {}) for s in range(1, 10)]},
        path,
    ),
    "training_curves_grad_norm": lambda path: training_curves({"align": HISTORIES["align"]}, path, key="grad_norm"),
    "noise_sweep": lambda path: noise_sweep(NOISE, path),
}


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("name", list(CASES))
def test_each_plot_writes_one_deterministic_png(tmp_path, name):
    path = tmp_path / "figures" / "nested" / f"{name}.png"  # missing folders are created
    returned = CASES[name](path)
    assert returned == path
    assert list(path.parent.iterdir()) == [path]
    assert _is_png(path)
    assert path.stat().st_size > 10_000  # axes, labels and data, not a blank canvas
    again = CASES[name](tmp_path / "again.png")
    assert again.read_bytes() == path.read_bytes()


def test_plots_accept_a_string_path(tmp_path):
    returned = win_rate_bars(WIN_ROWS[:1], str(tmp_path / "one.png"))
    assert isinstance(returned, Path) and _is_png(returned)


def test_training_curves_skip_runs_without_the_key(tmp_path):
    only_align = training_curves({"align": HISTORIES["align"]}, tmp_path / "a.png")
    with_summary = training_curves(
        {"align": HISTORIES["align"], "sft": [{"step": 3, "train_loss": 1.0}]}, tmp_path / "b.png"
    )
    assert with_summary.read_bytes() == only_align.read_bytes()


def test_different_data_draw_different_pictures(tmp_path):
    a = noise_sweep(NOISE, tmp_path / "a.png")
    b = noise_sweep({"dpo": NOISE["dpo"]}, tmp_path / "b.png")
    assert a.read_bytes() != b.read_bytes()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p: win_rate_bars([], p), "rows is empty"),
        (lambda p: reward_vs_temperature({}, p), "curves is empty"),
        (lambda p: reward_vs_temperature({"sft": {}}, p), r"curves\['sft'\] is empty"),
        (lambda p: layer_strength({}, p), "stats is empty"),
        (lambda p: layer_strength({"scit": {}}, p), r"stats\['scit'\] is empty"),
        (lambda p: training_curves({}, p), "histories is empty"),
        (lambda p: training_curves({"align": [], "dpo": [{"step": 1, "train_runtime": 2.0}]}, p), "'step' and 'loss'"),
        (lambda p: noise_sweep({}, p), "rows is empty"),
        (lambda p: noise_sweep({"dpo": {}}, p), r"rows\['dpo'\] is empty"),
    ],
)
def test_plots_reject_empty_input(tmp_path, call, match):
    path = tmp_path / "empty.png"
    with pytest.raises(ValueError, match=match):
        call(path)
    assert not path.exists()


@pytest.mark.parametrize("row", [{"win_rate": 0.7, "ci95": [0.2, 0.6]}, {"win_rate": 1.2, "ci95": [0.9, 1.3]}])
def test_win_rate_bars_reject_a_rate_outside_its_interval(tmp_path, row):
    with pytest.raises(ValueError, match="inside ci95"):
        win_rate_bars([{"method": "bad", **row}], tmp_path / "bad.png")
