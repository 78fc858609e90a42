"""bench/eval_curves.py: a run's evaluated epochs (test, training-image and validation ELBO) plotted and printed."""

import json
import subprocess
import sys

import pytest

from test_train_images import ROOT, run, tiny_flags, write_tiny_mnist


def eval_curves(*args):
    return subprocess.run([sys.executable, "bench/eval_curves.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("likelihood", ["continuous", "discretized"])
def test_the_curves_are_the_runs_own_and_the_selected_epoch_is_marked(tmp_path, likelihood):
    data = write_tiny_mnist(tmp_path / "mnist", n_train=256)
    result = run(["--epochs", "3", "--valid-images", "64", "--likelihood", likelihood, *tiny_flags(tmp_path, data)])
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    (folder,) = (tmp_path / "runs").iterdir()
    out = tmp_path / "curves.png"
    result = eval_curves(str(folder), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.stat().st_size > 5000
    lines = result.stdout.splitlines()
    named = "" if likelihood == "continuous" else "discretized likelihood, "  # its bounds are of the 8-bit data
    assert lines[0] == f"mnist, LV-VAE, 64 held out, {named}3 epochs:"
    assert lines[1] == "| epoch | test images | as many training images | validation images |"
    rows = [[float(cell) for cell in line.strip("| ").split(" | ")] for line in lines[2:5]]
    assert [row[0] for row in rows] == [1, 2, 3]
    for row, (epoch, valid) in zip(rows, record["selected"]["curve"]):
        assert row[3] == pytest.approx(valid, abs=0.051)  # the validation ELBO the selection saw
    assert lines[-1] == f"wrote {out}"
    # The same curves from the run's record alone (line 1 of runs.jsonl, or the file: every record with curves).
    assert [[epoch, valid] for epoch, _, _, valid in record["curves"]] == record["selected"]["curve"]
    record_file = tmp_path / "out" / "runs.jsonl"
    spec = f"{record_file}:1" if likelihood == "continuous" else str(record_file)  # one call a case: the suite's time
    from_record = eval_curves(spec, "--out", str(tmp_path / "from_record.png"))
    assert from_record.returncode == 0, from_record.stderr[-3000:]
    record_lines = from_record.stdout.splitlines()
    assert record_lines[0] == f"mnist, LV-VAE, 64 held out, {named}192 training images, 3 epochs (line 1):"
    assert record_lines[1] == lines[1]
    record_rows = [[float(cell) for cell in line.strip("| ").split(" | ")] for line in record_lines[2:5]]
    for record_row, row in zip(record_rows, rows, strict=True):  # TensorBoard keeps float32, the record float64
        assert record_row == pytest.approx(row, abs=0.051)


def test_a_folder_without_a_run_is_refused_with_one_line(tmp_path):
    result = eval_curves(str(tmp_path), "--out", str(tmp_path / "curves.png"))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "has no TensorBoard events or no ckpt.pt" in result.stderr and not (tmp_path / "curves.png").exists()


def test_records_without_curves_or_lines_without_records_are_refused_with_one_line(tmp_path):
    runs = tmp_path / "runs.jsonl"
    runs.write_text(json.dumps({"dataset": "mnist", "sigma": "learned"}) + "\n")  # recorded before curves were
    for spec, message in [(str(runs), "names no record with curves"), (f"{runs}:1", "names no record with curves"),
                          (f"{runs}:2", "has no record on line 2"), (str(tmp_path / "none.jsonl"), "not a readable")]:
        result = eval_curves(spec, "--out", str(tmp_path / "curves.png"))
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr and not (tmp_path / "curves.png").exists()
