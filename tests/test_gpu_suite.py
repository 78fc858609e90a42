"""bench/gpu_suite.sh in its CPU plumbing mode (TINY=1): every stage, the packing, and the MNIST run carried from one
session to the next as checkpoint pieces, whose damage stops the mnist stage with one line."""

import hashlib
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from common import load_checkpoint
from test_data import face, tiny_celeba
from test_train_images import ROOT, write_tiny_mnist

MIB = 2**20


def suite(folder, mnist, *stages, **env):
    """bench/gpu_suite.sh TINY=1 with its output, scratch and carried checkpoint in `folder`."""
    env = {**os.environ, "TINY": "1", "PYTHON": sys.executable, "OUT": str(folder / "out"),
           "SCRATCH": str(folder / "scratch"), "CKPT_DIR": str(folder / "ckpt"), "MNIST_DIR": str(mnist),
           "CELEBA_DIR": str(folder / "no_celeba"), **env}
    return subprocess.run(["bash", "bench/gpu_suite.sh", *stages], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def exits(log):
    return {name: int(rc) for name, rc in re.findall(r"^=== (\S+): exit (\d+) after \d+ s", log, re.M)}


def pieces(out):
    return sorted(out.glob("mnist_learned.ckpt.pt.part-*"))


def carry(out, folder, events=()):
    """The next session's ckpt/mnist_learned/: the pieces and sha256 from `out`, as the README says to copy them."""
    carried = folder / "ckpt" / "mnist_learned"
    carried.mkdir(parents=True)
    for path in [*pieces(out), out / "mnist_learned.ckpt.pt.sha256"]:
        (carried / path.name).write_bytes(path.read_bytes())
    for name, data in events:
        (carried / name).write_bytes(data)
    return carried


def joined_checkpoint(out, path):
    data = b"".join(piece.read_bytes() for piece in pieces(out))
    assert hashlib.sha256(data).hexdigest() == (out / "mnist_learned.ckpt.pt.sha256").read_text().split()[0]
    path.write_bytes(data)
    return load_checkpoint(path)


def members(out):
    with tarfile.open(out / "suite.tgz") as archive:
        return {member.name: member for member in archive.getmembers() if member.isfile()}


def results_listing():
    return sorted((path, os.stat(os.path.join(path, name)).st_mtime_ns, name)
                  for path, _, names in os.walk(os.path.join(ROOT, "results")) for name in names)


@pytest.fixture(scope="module")
def first_session(tmp_path_factory):
    folder = tmp_path_factory.mktemp("first")
    mnist = write_tiny_mnist(folder / "mnist")
    before = results_listing()
    result = suite(folder, mnist, MNIST_ROW="learned fixed")
    return folder, mnist, result, before


def test_every_stage_runs_packs_and_leaves_results_alone(first_session):
    folder, _, result, before = first_session
    out = folder / "out"
    log = (out / "suite.log").read_text()
    assert result.returncode == 0, log[-3000:]
    assert exits(log) == {"env": 0, "nll": 0, "nll-host": 0, "train": 0, "mnist_learned": 124,
                         "2d": 0}, log[-3000:]  # its box
    assert "=== tests: skipped" in log and "all that ran succeeded" in log.splitlines()[-1]
    assert re.search(r"^=== celeba: skipped, no .*no_celeba/img_align_celeba \(carry .* to run it\)$", log, re.M)
    assert "train_images.py --epochs 1000" in log and "--dataset mnist --sigma learned" in log
    # The row after one that the budget stopped waits for the next session: only one is ever carried.
    assert "=== mnist_fixed: skipped, the budget stopped mnist_learned before it" in log
    assert log.index("=== mnist_learned: exit") < log.index("=== 2d (time box")  # background lines come after
    packed = members(out)
    for name in ["results/bench_nll.md", "results/bench_nll_host_cpu.md", "results/bench_train.md",
                 "results/2d/tiny/table1.md"]:
        assert name in packed, sorted(packed)
    assert any(name.startswith("runs/gpu_suite_mnist_learned/events.out.tfevents.") for name in packed)
    assert sum(member.size for member in packed.values()) < 5 * MIB  # no checkpoint, nothing else big
    assert results_listing() == before  # a plumbing run writes nothing into results/
    # What the device tool returns: at most 8 flat files of at most 16 MiB; an MNIST checkpoint is 3 pieces.
    assert len(pieces(out)) == 3 and len(list(out.iterdir())) <= 8
    assert all(path.stat().st_size <= 15 * MIB for path in out.iterdir())
    assert joined_checkpoint(out, folder / "joined.pt")["step"] > 0


def test_the_next_session_resumes_the_carried_checkpoint(first_session, tmp_path):
    folder, mnist, _, _ = first_session
    with tarfile.open(folder / "out" / "suite.tgz") as archive:
        events = [(name.rsplit("/", 1)[1], archive.extractfile(name).read()) for name in archive.getnames()
                  if "tfevents" in name]
    carry(folder / "out", tmp_path, events)
    result = suite(tmp_path, mnist, "mnist")
    out = tmp_path / "out"
    log = (out / "suite.log").read_text()
    assert result.returncode == 0, log[-3000:]
    assert exits(log) == {"mnist_learned": 124} and "--resume" in log
    first = load_checkpoint(folder / "joined.pt")
    assert f"step {first['step'] + 1}:" in log  # the resumed run logs its first step, the one after the checkpoint
    assert joined_checkpoint(out, tmp_path / "joined.pt")["step"] > first["step"]
    # The carried TensorBoard events go on in the run folder beside the new ones: one curve.
    assert sum("tfevents" in name for name in members(out)) == 2


def test_a_damaged_piece_fails_the_mnist_stage_with_one_line(first_session, tmp_path):
    folder, mnist, _, _ = first_session
    carried = carry(folder / "out", tmp_path)
    piece = bytearray((carried / "mnist_learned.ckpt.pt.part-ab").read_bytes())
    piece[1000] ^= 1
    (carried / "mnist_learned.ckpt.pt.part-ab").write_bytes(piece)
    result = suite(tmp_path, mnist, "mnist")
    assert result.returncode == 1
    assert re.search(r"^=== mnist_learned: error: the pieces in .* do not join to the checkpoint their sha256 names",
                     result.stdout, re.M), result.stdout
    assert "mnist_learned=sha256" in result.stdout and not pieces(tmp_path / "out")


def test_celeba_rows_train_side_by_side_and_record_table_2(tmp_path):
    data = tmp_path / "celeba"
    tiny_celeba(data, splits=(0,) * 32 + (1,) * 2 + (2,) * 4)
    result = suite(tmp_path, tmp_path, "celeba", CELEBA_DIR=str(data), CELEBA_ROWS="fixed warmstart",
                   CELEBA_FLAGS="--valid-images 2")
    log = (tmp_path / "out" / "suite.log").read_text()
    assert result.returncode == 0, log[-3000:]
    assert exits(log) == {"celeba-fixed": 0, "celeba-warmstart": 0}
    assert "--sigma learned --lv-warmup 9360" in log and log.count(" --valid-images 2 ") == 2
    packed = members(tmp_path / "out")
    for row in ("fixed", "warmstart"):
        assert any(name.startswith(f"runs/gpu_suite_celeba_{row}/events.out.tfevents.") for name in packed)
    with tarfile.open(tmp_path / "out" / "suite.tgz") as archive:
        table = archive.extractfile("results/images/table2.md").read().decode()
        records = archive.extractfile("results/images/runs.jsonl").read().decode()
    # Both processes append to runs.jsonl and rewrite table2.md from it: neither row may be lost.
    main, selected = table.split("\n## Selected on validation")
    assert main.count("| celeba |") == 2 and len(records.splitlines()) == 2, table
    assert selected.count("| celeba |") == 2  # CELEBA_FLAGS reached both rows
    assert sorted(path.name for path in data.iterdir()) == ["img_align_celeba", "list_eval_partition.txt"]  # as carried


def test_celeba_carried_in_parts_is_joined_and_a_missing_part_fails_with_one_line(tmp_path):
    # The device tool's 64 MiB do not hold the offline CelebA folder beside the tracked files: it travels in two
    # parts, one a call, and the suite joins them (links) before training.
    whole = tmp_path / "celeba"
    tiny_celeba(whole, splits=(0,) * 32 + (2,) * 4)
    names = sorted(path.name for path in (whole / "img_align_celeba").iterdir())
    for part, chosen in [("celeba_a", names[:18]), ("celeba_b", names[18:])]:
        (tmp_path / part / "img_align_celeba").mkdir(parents=True)
        for name in chosen:
            (tmp_path / part / "img_align_celeba" / name).write_bytes((whole / "img_align_celeba" / name).read_bytes())
    (tmp_path / "celeba_b" / "list_eval_partition.txt").write_bytes((whole / "list_eval_partition.txt").read_bytes())
    parts = f"{tmp_path / 'celeba_a'} {tmp_path / 'celeba_b'}"
    result = suite(tmp_path, tmp_path, "celeba", CELEBA_PARTS=parts, CELEBA_ROWS="fixed")
    log = (tmp_path / "out" / "suite.log").read_text()
    assert result.returncode == 0 and exits(log) == {"celeba-fixed": 0}, log[-3000:]
    assert re.search(r"^=== celeba: joined .*celeba_a .*celeba_b: 36 images in img_align_celeba$", log, re.M), log
    assert "found 32 train, 0 valid, 4 test images" in log, log[-3000:]
    # A third part, a folder of half-size faces (000001, in both; 000037, a new training face; 000039, a test face),
    # joined and passed as --celeba-extra-train
    (tmp_path / "celeba_c" / "img_align_celeba_89x109").mkdir(parents=True)
    for number in [1, 37, 39]:
        face(number, (89, 109)).save(tmp_path / "celeba_c" / "img_align_celeba_89x109" / f"{number:06d}.jpg")
    result = suite(tmp_path, tmp_path, "celeba", CELEBA_PARTS=f"{parts} {tmp_path / 'celeba_c'}", CELEBA_ROWS="fixed",
                   CELEBA_EXTRA="img_align_celeba_89x109")
    log = (tmp_path / "out" / "suite.log").read_text()
    assert result.returncode == 0 and exits(log) == {"celeba-fixed": 0}, log[-3000:]
    assert re.search(r"^=== celeba: joined .*celeba_c: 36 images in img_align_celeba 3 images in "
                     r"img_align_celeba_89x109$", log, re.M), log
    assert "1 training images of img_align_celeba_89x109 join the 32 of img_align_celeba: 33 (1 in both" in log
    result = suite(tmp_path, tmp_path, "celeba", CELEBA_PARTS=f"{tmp_path / 'gone'} {tmp_path / 'celeba_b'}",
                   CELEBA_ROWS="fixed")
    assert result.returncode == 1 and "celeba=no-data" in result.stdout, result.stdout
    assert re.search(r"^=== celeba: error: no .*gone; carry .*gone to the device", result.stdout, re.M), result.stdout
    result = suite(tmp_path, tmp_path, "celeba", CELEBA_PARTS=parts, CELEBA_ROWS="fixed",
                   CELEBA_EXTRA="img_align_celeba_89x109")  # the extra folder's part not carried
    assert result.returncode == 1 and "celeba=no-data" in result.stdout, result.stdout
    assert re.search(r"^=== celeba: error: no .*img_align_celeba_89x109; carry the part that holds "
                     r"img_align_celeba_89x109/, named in CELEBA_PARTS, to the device$", result.stdout, re.M), \
        result.stdout


def test_mnist_rows_that_finish_run_one_after_the_other(tmp_path):
    mnist = write_tiny_mnist(tmp_path / "mnist")
    result = suite(tmp_path, mnist, "mnist", MNIST_ROW="fixed warmstart-optimal", MNIST_EPOCHS="1")
    out = tmp_path / "out"
    log = (out / "suite.log").read_text()
    assert result.returncode == 0, log[-3000:]
    assert exits(log) == {"mnist_fixed": 0, "mnist_warmstart-optimal": 0}, log[-3000:]
    assert "=== mnist_warmstart-optimal: all 1 epochs done" in log and not list(out.glob("*.ckpt.pt.*"))  # no carry
    assert "--sigma learned --lv-warmup 9360 --lv-warmup-sigma optimal" in log
    # at toy sizes the hand-over never comes, and the run says so
    assert re.search(r"warning: --lv-warmup 9360 is not below this run's (\d+) steps \(1 epochs of \1\): the "
                     "per-pixel sigma head never trains, so this is a sigma-VAE run under the warm start's name",
                     log), log[-3000:]
    with tarfile.open(out / "suite.tgz") as archive:
        table = archive.extractfile("results/images/table2.md").read().decode()
    assert table.count("| mnist |") == 2 and "| LV-VAE, warm start (9360 steps of sigma-VAE) |" in table, table


def test_a_call_cut_short_still_brings_back_the_rows_that_finished(tmp_path):
    # The device tool kills a call at its limit: suite.tgz is rewritten after every finished row, so the first row's
    # record comes back though the second row and the final packing never ran.
    mnist = write_tiny_mnist(tmp_path / "mnist")
    env = {**os.environ, "TINY": "1", "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "SCRATCH": str(tmp_path / "scratch"), "CKPT_DIR": str(tmp_path / "ckpt"), "MNIST_DIR": str(mnist),
           "CELEBA_DIR": str(tmp_path / "no_celeba"), "MNIST_ROW": "fixed learned", "MNIST_EPOCHS": "1"}
    call = subprocess.Popen(["bash", "bench/gpu_suite.sh", "mnist"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "out" / "suite.log"
    try:
        deadline = time.time() + 240
        while "=== mnist_learned (time box" not in (log.read_text() if log.exists() else ""):
            assert call.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(call.pid, signal.SIGKILL)
        call.wait()
    text = log.read_text()
    assert "=== summary" not in text and re.search(r"^=== packed .*suite.tgz: \d+ files", text, re.M), text[-3000:]
    with tarfile.open(tmp_path / "out" / "suite.tgz") as archive:
        table = archive.extractfile("results/images/table2.md").read().decode()
    assert table.count("| mnist |") == 1 and "| F-VAE (sigma=0.707) |" in table, table


def test_unknown_stage_and_spent_budget(tmp_path):
    result = suite(tmp_path, tmp_path, "env", "gpu")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "gpu_suite.sh: no stage 'gpu'; stages: env nll train tests 2d celeba mnist"]
    # A stage named without its data fails with one line that says what to carry.
    result = suite(tmp_path, tmp_path / "absent", "mnist")
    assert result.returncode == 1 and re.search(r"^=== mnist: error: no .*absent; carry .*absent to the device",
                                                 result.stdout, re.M), result.stdout
    result = suite(tmp_path, tmp_path, "mnist", MNIST_ROW="lv")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        ("gpu_suite.sh: no Table 2 row 'lv'; rows: fixed learned-scalar learned warmstart warmstart-optimal optimal "
         "discretized")]
    # A row that would start with less of the budget than MNIST_MIN_BOX waits, and so does every row after it.
    result = suite(tmp_path, tmp_path, "mnist", MNIST_ROW="fixed learned", MNIST_MIN_BOX="100000")
    assert result.returncode == 0, result.stdout
    assert re.search(r"^=== mnist_fixed: skipped, \d+ s left, below MNIST_MIN_BOX=100000$", result.stdout, re.M)
    assert "mnist_fixed=skipped mnist_learned=skipped" in result.stdout, result.stdout
    # 30 s leave 5 s after the 25 s kept for packing: every stage is skipped, which is no failure.
    result = suite(tmp_path, tmp_path, "env", "nll", BUDGET="30")
    assert result.returncode == 0, result.stdout
    assert re.search(r"^=== env: skipped, [45] s of the budget left", result.stdout, re.M), result.stdout
    assert "=== nll: skipped" in result.stdout and "env=skipped nll=skipped nll-host=skipped" in result.stdout
