"""theory.py: Eq. 8 in closed form against quadrature, the exact threshold sqrt(D), stability, the training check."""

import math
import subprocess
import sys

import numpy as np
import pytest

import theory

ROOT = theory.__file__.rsplit("/", 1)[0]


@pytest.mark.parametrize("D", [2, 10])
def test_numerical_critical_ratio_is_sqrt_d(D):
    assert theory.critical_ratio(D) == pytest.approx(math.sqrt(D), rel=1e-3)


@pytest.mark.parametrize("D", [2, 3, 10, 100])
def test_optimal_radius_is_zero_below_and_near_r_well_above(D):
    for a in [0.3 * math.sqrt(D), math.sqrt(D - 1), 0.99 * math.sqrt(D)]:  # includes the theorem's own bound
        assert theory.optimal_radius(a, D) == 0.0
    a = 3 * math.sqrt(D)
    assert theory.optimal_radius(a, D) > 0.5 * a  # r* > R/2


def test_the_transition_is_continuous_with_the_derived_quartic():
    # Just above sqrt(D): r*^2 = 2 (D+2) D^2 (a^2/D - 1) / (2 a^4) from f = c2 rho^2 + c4 rho^4; no jump.
    D = 3
    for excess in [1e-3, 1e-4]:
        a = math.sqrt(D) * (1 + excess)
        c2, c4 = 0.5 * (a**2 / D - 1), -(a**4) / (4 * D**2 * (D + 2))
        assert theory.optimal_radius(a, D) == pytest.approx(math.sqrt(-c2 / (2 * c4)), rel=0.02)
    rho = np.array([1e-3, 1e-2, 5e-2])
    a = 2.0
    expansion = 0.5 * rho**2 * (a**2 / D - 1) - a**4 * rho**4 / (4 * D**2 * (D + 2))
    np.testing.assert_allclose(theory.log_p_eq8(rho, a, D), expansion, rtol=1e-4)


@pytest.mark.parametrize("D", [2, 3, 5, 10, 30])
@pytest.mark.parametrize("rho, a", [(0.01, 0.5), (0.5, 1.0), (2.0, 3.0), (5.0, 5.0), (10.0, 20.0)])
def test_bessel_form_equals_direct_quadrature(D, rho, a):
    assert theory.log_p_eq8(rho, a, D) == pytest.approx(theory.log_p_eq8_quadrature(rho, a, D), rel=1e-9, abs=1e-9)


def test_finite_at_extreme_arguments():
    for D in [2, 3, 1000, 2000]:
        rho = np.array([0.0, 1e-12, 1e-3, 1.0, 99.0, 100.0, 150.0, 300.0])
        for a in [1e-3, 1.0, 100.0, 300.0]:
            values = theory.log_p_eq8(rho, a, D)
            assert np.isfinite(values).all(), (D, a, values)
        assert theory.optimal_radius(100.0, D) == pytest.approx(100 - (D - 1) / 200, rel=0.01)  # r* -> R


@pytest.mark.parametrize("D", [2, 10, 1000])
def test_log_0f1_is_concave(D):
    assert theory.log_0f1_is_concave(D)


def test_training_check_runs_end_to_end(tmp_path):
    out = tmp_path / "new" / "folder"  # made by the script
    result = subprocess.run(
        [sys.executable, "theory.py", "--dims", "2", "--heatmap-dims", "2", "--train", "--train-dims", "2",
         "--seeds", "2", "--steps", "20", "--hidden", "16", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (out / "training_check.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 2 and all("nan" not in row for row in rows)
    for name in ["threshold.md", "fig2_heatmap_D2.png", "training_check.png"]:
        assert (out / name).stat().st_size > 1000


def test_an_output_folder_that_cannot_be_made_gives_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = subprocess.run([sys.executable, "theory.py", "--dims", "2", "--out", str(tmp_path / "a_file" / "x")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: --out {tmp_path / 'a_file' / 'x'}: ")


def test_bad_dimension_is_refused():
    result = subprocess.run([sys.executable, "theory.py", "--dims", "1"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "must be >= 2" in result.stderr


@pytest.mark.parametrize("D", [2, 3, 10])
def test_a_learned_sigma_at_the_collapse_sits_on_the_threshold_at_a_saddle_of_order_four(D):
    R = 1.0
    # Collapsed (r = 0), p(x) = N(0, sigma^2 I): the best sigma is R / sqrt(D), the critical ratio.
    grid = np.linspace(0.3, 1.5, 120001)
    best = grid[np.argmax(theory.log_p_sphere(0.0, grid, R, D))]
    assert best == pytest.approx(R / math.sqrt(D), abs=2e-5)
    sigma = R / math.sqrt(D)
    # The Hessian in (s = r^2, t = log sigma) by central differences, against the docstring's closed form.
    L = lambda s, t: float(theory.log_p_sphere(math.sqrt(s), math.exp(t), R, D))
    t0, hs, ht = math.log(sigma), 1e-3, 1e-3
    d_ss = (L(2 * hs, t0) - 2 * L(hs, t0) + L(0, t0)) / hs**2  # one-sided in s (s >= 0)
    d_tt = (L(0, t0 + ht) - 2 * L(0, t0) + L(0, t0 - ht)) / ht**2
    d_st = (L(hs, t0 + ht) - L(hs, t0 - ht) - L(0, t0 + ht) + L(0, t0 - ht)) / (2 * hs * ht)
    assert d_ss == pytest.approx(-1 / (2 * (D + 2) * sigma**4), rel=0.02)
    assert d_tt == pytest.approx(-2 * D, rel=1e-3)
    assert d_st == pytest.approx(-1 / sigma**2, rel=0.02)
    assert d_ss * d_tt - d_st**2 < 0  # a saddle, not a maximum
    # Along the ascent path (sigma lowered as r grows) L gains r^4 / (2 D (D+2) sigma^4); at fixed sigma it loses.
    for r in [0.05, 0.1]:
        t = t0 - r**2 / (2 * D * sigma**2)
        assert L(r**2, t) - L(0, t0) == pytest.approx(r**4 / (2 * D * (D + 2) * sigma**4), rel=0.1)
        assert L(r**2, t0) < L(0, t0)
