"""bench/gap_terms.py: a run's generalisation gap split by Eq. 11 into the code's, sigma's and the residuals' parts."""

import json
import re
import subprocess
import sys

import pytest

from test_train_images import ROOT, run, tiny_flags, write_tiny_mnist


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The last checkpoints of two one-epoch runs: LV-VAE and F-VAE."""
    tmp_path = tmp_path_factory.mktemp("gap_terms")
    data = write_tiny_mnist(tmp_path / "mnist")
    paths = []
    for sigma in ["learned", "fixed"]:
        logdir = tmp_path / sigma
        result = run(["--epochs", "1", "--sigma", sigma, *tiny_flags(logdir, data)])
        assert result.returncode == 0, result.stderr[-3000:]
        (path,) = (logdir / "runs").glob("*/ckpt.pt")
        paths.append(str(path))
    return tmp_path, paths


def gap_terms(*args):
    return subprocess.run([sys.executable, "bench/gap_terms.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_the_parts_add_up_to_the_gap(checkpoints, tmp_path):
    paths = checkpoints[1]
    out = tmp_path / "gap_terms.md"
    result = gap_terms(*paths, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Where the generalisation gap lives") and f"--out {out}`" in text
    rows = [line for line in text.splitlines() if line.startswith("| mnist |")]
    assert [row.split(" | ")[1] for row in rows] == ["LV-VAE", "F-VAE (sigma=0.707)"]
    for row in rows:
        cells = row.split(" | ")
        test, train, gap, kl, log_sigma, residual = (float(cell) for cell in cells[5:11])
        assert gap == pytest.approx(train - test, abs=0.11) and gap == pytest.approx(kl + log_sigma + residual,
                                                                                     abs=0.2)
        means = [float(value) for value in re.findall(r"-?\d+\.\d+", cells[12])]
        assert len(means) == 2 and all(-7 < value < 1 for value in means)
    # A fixed sigma is the same on every image: no part of the gap is sigma's.
    assert float(rows[1].split(" | ")[9]) == 0.0 and rows[1].split(" | ")[12] == "-0.347 / -0.347"


def test_a_record_with_the_split_gives_its_own_numbers(checkpoints, tmp_path):
    folder = checkpoints[0]
    records = folder / "learned" / "out" / "runs.jsonl"
    (run,) = [json.loads(line) for line in records.read_text().splitlines()]
    out = tmp_path / "from_records.md"
    result = gap_terms(str(records), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [line for line in out.read_text().splitlines() if line.startswith("| mnist |")]
    cells = row.split(" | ")
    assert cells[1] == "LV-VAE" and cells[4] == "record" and cells[-1] == f"`{records}, record 1` |"
    test, _, gap, kl, log_sigma, residual = (float(cell) for cell in cells[5:11])
    assert test == pytest.approx(run["final"]["nats_per_image"], abs=0.051)
    assert gap == pytest.approx(run["final_train"]["nats_per_image"] - run["final"]["nats_per_image"], abs=0.051)
    assert kl == pytest.approx(run["final"]["kl_nats_per_image"] - run["final_train"]["kl_nats_per_image"], abs=0.051)
    assert gap == pytest.approx(kl + log_sigma + residual, abs=0.2)


def test_a_record_selected_on_validation_splits_its_selected_epoch_too(checkpoints, tmp_path):
    (run,) = [json.loads(line) for line in (checkpoints[0] / "learned" / "out" / "runs.jsonl").read_text().splitlines()]
    shifted = lambda bound: {**bound, "nats_per_image": bound["nats_per_image"] - 10.0,
                             "kl_nats_per_image": bound["kl_nats_per_image"] + 10.0}  # 10 more nats of code
    last_selected = {**run, "selected": {"epoch": 1, "final": run["final"], "final_train": run["final_train"]}}
    earlier = {**run, "epochs": 3, "selected": {"epoch": 2, "final": shifted(run["final"]),
                                                 "final_train": run["final_train"]}}
    records = tmp_path / "runs.jsonl"
    records.write_text(json.dumps(last_selected) + "\n" + json.dumps(earlier) + "\n")
    out = tmp_path / "selected.md"
    result = gap_terms(str(records), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| mnist |")]
    assert [row[3] for row in rows] == ["1", "3", "2 (selected on validation)"]  # a last-epoch selection adds no row
    gap = lambda row: float(row[7])
    assert gap(rows[2]) == pytest.approx(gap(rows[1]) + 10.0, abs=0.11)
    assert float(rows[2][8]) == pytest.approx(float(rows[1][8]) + 10.0, abs=0.11)  # all of it the KL's part
    assert float(rows[2][9]) == float(rows[1][9]) and float(rows[2][10]) == float(rows[1][10])


def test_a_discretized_run_and_a_bad_file_are_refused_with_one_line(checkpoints, tmp_path):
    paths = checkpoints[1]
    data = write_tiny_mnist(tmp_path / "mnist")
    result = run(["--epochs", "1", "--likelihood", "discretized", *tiny_flags(tmp_path, data)])
    assert result.returncode == 0, result.stderr[-3000:]
    (discretized,) = (tmp_path / "runs").glob("*/ckpt.pt")
    result = gap_terms(paths[0], str(discretized), "--out", str(tmp_path / "t.md"))
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: {discretized} is a discretized-likelihood run: Eq. 11's split needs the continuous one; leave it out"]
    missing = tmp_path / "absent.pt"
    result = gap_terms(str(missing), "--out", str(tmp_path / "t.md"))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1 and str(missing) in result.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"dataset": "mnist"\n')
    result = gap_terms(str(broken), "--out", str(tmp_path / "t.md"))
    assert result.returncode == 1 and result.stderr.strip().splitlines()[0].startswith(
        f"error: {broken} is not a readable runs.jsonl") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t.md").exists()
