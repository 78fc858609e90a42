"""bench/circle_handover.py: the KL before a warm start's hand-over, the comparison of the seeds that left the
circle's collapse with those that stayed, and the table it writes."""

import argparse
import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("circle_handover", os.path.join(ROOT, "bench", "circle_handover.py"))
circle_handover = importlib.util.module_from_spec(spec)
spec.loader.exec_module(circle_handover)


def test_the_kl_before_the_handover_is_the_mean_of_the_records_in_its_window():
    # Records every 20 steps; hand-over after 100, window 40: the records of steps 80 and 100, not 60 nor 120.
    steps = np.arange(20, 201, 20)
    kl = np.stack([steps * 1.0, steps * 2.0], axis=1)  # two seeds
    log_sigma = np.log(np.stack([steps / 1000, steps / 500], axis=1))
    history = {"step": steps, "kl": kl, "log_sigma": log_sigma}
    mean_kl, sigma = circle_handover.before_handover(history, warmup=100, window=40)
    assert mean_kl.tolist() == [90.0, 180.0] and sigma.tolist() == pytest.approx([0.1, 0.2])


def test_left_against_stayed_tests_the_direction_and_copes_with_an_empty_group():
    kl = np.array([0.05, 0.04, 0.06, 0.03, 0.01, 0.00, 0.02, 0.01])
    left = np.array([True, True, True, True, False, False, False, False])
    (median_left, median_stayed), p = circle_handover.left_against_stayed(kl, left)
    assert (median_left, median_stayed) == (0.045, 0.01) and p < 0.05
    assert circle_handover.left_against_stayed(kl, ~left)[1] > 0.95  # the other direction: no support
    (median_left, median_stayed), p = circle_handover.left_against_stayed(kl, np.zeros(8, dtype=bool))
    assert median_left is None and median_stayed == pytest.approx(0.025) and p is None


def test_the_script_writes_its_table_with_a_row_per_seed_and_setting(tmp_path):
    out = tmp_path / "handover.md"
    args = argparse.Namespace(seeds=2, steps=60, hidden=16, lv_warmup=40, window=20, logdir=str(tmp_path / "runs"),
                              out=str(out))
    circle_handover.main(args)
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| LV-VAE, warm start")]
    assert len(rows) == 2 + 2 * 2  # the two settings' summaries, then each seed of each
    assert "| both rows | " in text and "of 4 |" in text
    for row in rows[2:]:
        cells = row.strip("| ").split(" | ")
        assert cells[1] in ("0", "1") and float(cells[2]) >= 0 and cells[-1] in ("yes", "no")
        assert (float(cells[5]) > circle_handover.ESCAPED) == (cells[-1] == "yes")
