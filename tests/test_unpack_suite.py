"""bench/unpack_suite.py: the archives of several GPU calls, unpacked in turn, keep every call's Table 2 rows."""

import io
import json
import os
import tarfile

import pytest

from bench.unpack_suite import main, unpack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "results", "images", "runs.jsonl")) as f:
    REAL = [line.strip() for line in f if line.strip()]  # records as train_images.py writes them


def record(index, command):
    """A real record with its own command, so that its table row can be found."""
    run = json.loads(REAL[index])
    run["command"] = command
    return json.dumps(run)


def archive(path, files):
    """A suite.tgz holding {name: text or bytes}, with the folders tar lists, as gpu_suite.sh packs it."""
    with tarfile.open(path, "w:gz") as tar:
        for folder in ("results", "results/images", "runs", "runs/a"):
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in files.items():
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture
def checkout(tmp_path):
    """A repository root whose runs.jsonl holds two records; each GPU call starts from a copy of it."""
    root = tmp_path / "repo"
    (root / "results" / "images").mkdir(parents=True)
    base = [record(0, "python train_images.py --base 0"), record(1, "python train_images.py --base 1")]
    (root / "results" / "images" / "runs.jsonl").write_text("".join(line + "\n" for line in base))
    return root, base


def test_two_calls_keep_both_rows_and_their_files(checkout, tmp_path):
    root, base = checkout
    first = record(2, "python train_images.py --call one")
    second = record(3, "python train_images.py --call two")
    one = archive(tmp_path / "one.tgz", {
        "results/images/runs.jsonl": "\n".join(base + [first]) + "\n",
        "results/images/table2.md": "one call's table\n",
        "results/images/one.png": b"\x89PNG one",
        "runs/a/events.one": b"events"})
    two = archive(tmp_path / "two.tgz", {  # the second call's copy of the checkout did not have the first's row
        "results/images/runs.jsonl": "\n".join(base + [second]) + "\n",
        "results/images/table2.md": "two's table\n",
        "results/images/two.png": b"\x89PNG two"})
    main([one, two, "--root", str(root)])
    lines = (root / "results" / "images" / "runs.jsonl").read_text().splitlines()
    assert lines == base + [first, second]
    table = (root / "results" / "images" / "table2.md").read_text()
    assert table.startswith("# Table 2") and "call's table" not in table
    for command in ("--base 0", "--base 1", "--call one", "--call two"):
        assert command in table
    assert (root / "results" / "images" / "one.png").read_bytes() == b"\x89PNG one"
    assert (root / "results" / "images" / "two.png").read_bytes() == b"\x89PNG two"
    assert (root / "runs" / "a" / "events.one").read_bytes() == b"events"
    # Unpacking the same archives again adds nothing.
    assert unpack([one, two], str(root))[1] == {"results/images/runs.jsonl": 0}
    assert (root / "results" / "images" / "runs.jsonl").read_text().splitlines() == base + [first, second]


def test_an_archive_without_records_is_written_as_it_is(checkout, tmp_path):
    root = checkout[0]
    bench = archive(tmp_path / "bench.tgz", {"results/bench_nll.md": "# the kernel's speed\n"})
    written, appended = unpack([bench], str(root))
    assert written == ["results/bench_nll.md"] and appended == {}
    assert (root / "results" / "bench_nll.md").read_text() == "# the kernel's speed\n"
    assert not (root / "results" / "images" / "table2.md").exists()  # no records came: the table is not touched


@pytest.mark.parametrize("damage", ["truncated", "outside", "absolute", "record", "missing"])
def test_a_bad_archive_stops_before_anything_is_written(checkout, tmp_path, damage):
    root, base = checkout
    good = archive(tmp_path / "good.tgz", {
        "results/images/runs.jsonl": "\n".join(base + [record(2, "python train_images.py --good")]) + "\n",
        "results/images/good.png": b"png"})
    bad = tmp_path / "bad.tgz"
    if damage == "truncated":
        archive(tmp_path / "whole.tgz", {"results/images/x.png": os.urandom(4096)})
        data = (tmp_path / "whole.tgz").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "outside":
        archive(bad, {"../evil.txt": "x"})
    elif damage == "absolute":
        archive(bad, {"/tmp/evil.txt": "x"})
    elif damage == "record":
        archive(bad, {"results/images/runs.jsonl": REAL[0] + "\n{not json\n"})
    before = (root / "results" / "images" / "runs.jsonl").read_text()
    with pytest.raises(SystemExit) as stop:
        unpack([good, str(bad)], str(root))
    message = str(stop.value)
    assert "\n" not in message and str(bad) in message
    assert {"truncated": "not a readable suite.tgz", "outside": "not a plain file inside the repository",
            "absolute": "not a plain file inside the repository", "record": "line 2 is not a JSON record",
            "missing": "not a readable suite.tgz"}[damage] in message
    assert (root / "results" / "images" / "runs.jsonl").read_text() == before
    assert not (root / "results" / "images" / "good.png").exists()
