"""Fault injection: damaged data files, NaNs, signals, killed saves, damaged checkpoints -> results/reliability.md.

    python bench/reliability.py                 # ~5 min on a 2-core CPU
    python bench/reliability.py --inputs 200 --signal-trials 2 --torchrun-trials 1

1. Data (in this process): MNIST's train images and labels, raw and gzip, and a CelebA JPEG, each cut at random
   lengths, with 1-4 random bits flipped and with a random header, --inputs times per fault. Each outcome is checked
   against what the damaged bytes hold: an independent IDX reading for raw files, the original for gzip (CRC-32) and
   for cut or re-headed JPEGs, what Pillow decodes for bit-flipped JPEGs (JPEG has no checksum).
2. Training (train_images.py on a tiny MNIST, one process and torchrun with 2 gloo processes): a NaN injected in the
   loss and in the gradients (VAE_INJECT_NAN_AT_STEP); SIGTERM and SIGINT at random moments, each run resumed and
   compared bit for bit with an uninterrupted one; SIGKILL in the middle of checkpoint saves; damaged checkpoints given
   to --resume (cut at random lengths, random bit flips, another program's file, another model's shapes).
"""

import argparse
import collections
import contextlib
import gzip
import io
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_images  # noqa: E402  (the script under test, imported for its in-process --resume path)
from common import CELEBA_CROP, CELEBA_SIZE, DataError, decode_celeba_jpeg, load_checkpoint, load_mnist  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--inputs", type=int, default=1000, help="damaged inputs per data file and fault (default 1000)")
parser.add_argument("--signal-trials", type=int, default=4, help="signals sent to one-process runs (default 4)")
parser.add_argument("--torchrun-trials", type=int, default=2, help="signals sent to 2-process torchrun runs "
                    "(default 2)")
parser.add_argument("--kill-trials", type=int, default=10, help="saves killed with SIGKILL (default 10)")
parser.add_argument("--checkpoint-inputs", type=int, default=100, help="damaged checkpoints per fault (default 100)")
parser.add_argument("--seed", type=int, default=0, help="seeds every fault (default 0)")
parser.add_argument("--out", default=str(ROOT / "results" / "reliability.md"), help="default results/reliability.md")

EXPECTED = {  # every other outcome is a failure, counted at the top of the report
    "DataError, one line naming the file", "loaded exactly what the bytes hold", "loaded the original",
    "loaded another image: what Pillow decodes (JPEG has no checksum)", "refused with one line",
    "resumed with exactly the original weights", "resumed: bit-identical to the uninterrupted run",
    "finished first: nothing to resume", "previous checkpoint loads, intact", "loads, step 3 (end of epoch 1), finite",
}


# --- data files ---


def flip_bits(data, rng):
    data = bytearray(data)
    for bit in set(rng.integers(0, 8 * len(data), size=rng.integers(1, 5)).tolist()):
        data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def idx_header(rng):
    magic = rng.choice([2049, 2051, 0x03080000, 0, int(rng.integers(0, 2**32))])
    dims = [int(rng.choice([0, 3, 28, rng.integers(0, 65), rng.integers(0, 2**32)])) for _ in range(rng.integers(0, 5))]
    return struct.pack(f">{1 + len(dims)}I", int(magic), *dims)


def damage(data, fault, header_size, header, rng):
    if fault == "truncated":
        return data[: rng.integers(0, len(data))]
    if fault == "bits flipped":
        return flip_bits(data, rng)
    return header(rng) + data[header_size:]


def read_idx_independently(data, magic, ndim):
    """The array an IDX file holds, read with int.from_bytes; None when it is not an IDX file of this kind."""
    header_size = 4 + 4 * ndim
    if len(data) < header_size or int.from_bytes(data[:4], "big") != magic:
        return None
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if header_size + math.prod(shape) != len(data):
        return None
    return np.frombuffer(data[header_size:], np.uint8).reshape(shape)


def outcome(load, expected, path, original=None, may_refuse=False):
    """Run load() and say how it went against `expected` (None: the file is invalid and must raise DataError)."""
    try:
        result = load()
    except DataError as error:
        message = str(error)
        if "\n" in message or not message.startswith("error: ") or str(path) not in message:
            return "DataError with a malformed message"
        refusal_expected = expected is None or may_refuse
        return "DataError, one line naming the file" if refusal_expected else "WRONG: refused a valid file"
    except Exception as error:
        return f"UNHANDLED {type(error).__name__}"
    if expected is None:
        return "WRONG: loaded an invalid file"
    if not np.array_equal(np.asarray(result), expected):
        return "WRONG: loaded other data"
    if original is not None and not np.array_equal(expected, original):
        return "loaded another image: what Pillow decodes (JPEG has no checksum)"
    return "loaded the original" if may_refuse or original is not None else "loaded exactly what the bytes hold"


def fuzz_mnist(inputs, rng, folder):
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, 3, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, 3, dtype=np.uint8)}
    raw = {name: struct.pack(f">{1 + a.ndim}I", 2051 if a.ndim == 3 else 2049, *a.shape) + a.tobytes()
           for name, a in arrays.items()}
    images, labels = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
    folder.mkdir()
    for name, content in raw.items():  # the intact files, gzip; a raw file next to one is read first
        (folder / f"{name}.gz").write_bytes(gzip.compress(content, mtime=0))
    load = lambda: load_mnist(str(folder), "train")
    counts = collections.defaultdict(collections.Counter)
    for name in (images, labels):
        for compressed in (False, True):
            target = f"MNIST train {name.split('-')[1]}, {'gzip' if compressed else 'raw'}"
            path, intact = folder / (f"{name}.gz" if compressed else name), (folder / f"{name}.gz").read_bytes()
            data = intact if compressed else raw[name]
            header = (lambda r: bytes(r.integers(0, 256, 10, dtype=np.uint8))) if compressed else idx_header
            header_size = 10 if compressed else 4 + 4 * arrays[name].ndim
            for fault in ("truncated", "bits flipped", "wrong header"):
                for _ in range(inputs):
                    bad = damage(data, fault, header_size, header, rng)
                    path.write_bytes(bad)
                    if compressed:  # what a CRC-checked gzip stream accepts must be the original
                        test = outcome(load, arrays[images][:, None], path, may_refuse=True)
                    else:
                        files = dict(raw, **{name: bad})
                        read = (read_idx_independently(files[images], 2051, 3),
                                read_idx_independently(files[labels], 2049, 1))
                        valid = all(a is not None for a in read) and read[0].shape[1:] == (28, 28) and \
                            0 < len(read[0]) == len(read[1]) and read[1].max() <= 9
                        test = outcome(load, read[0][:, None] if valid else None, path)
                    counts[target, fault][test] += 1
            path.unlink()
            (folder / f"{name}.gz").write_bytes(intact)
    return counts


def face_jpeg(seed, size=(89, 109)):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([127 + 100 * np.sin(x / (5 + 3 * c) + y / (7 + c) + seed) for c in range(3)], -1)
    buffer = io.BytesIO()
    Image.fromarray((pixels + rng.normal(0, 12, pixels.shape)).clip(0, 255).astype(np.uint8)).save(buffer, "JPEG",
                                                                                                   quality=90)
    return buffer.getvalue()


def pillow_decode(data, size):
    """What Pillow decodes from these bytes by decode_celeba_jpeg's recipe; None when it refuses them."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
    except Exception:
        return None
    width, height = image.size
    if width * CELEBA_SIZE[1] != height * CELEBA_SIZE[0]:
        return None
    box = tuple(corner * width / CELEBA_SIZE[0] for corner in CELEBA_CROP)
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box)).transpose(2, 0, 1)


def fuzz_jpeg(inputs, rng, folder):
    jpeg, counts = face_jpeg(0), collections.defaultdict(collections.Counter)
    original = pillow_decode(jpeg, 16)
    other_magic = [b"\x89PNG", b"GIF8", b"BM\0\0", b"\0" * 4]
    header = lambda r: other_magic[r.integers(0, 4)] if r.random() < 0.2 else \
        bytes(r.integers(0, 256, 4, dtype=np.uint8))
    folder.mkdir(exist_ok=True)
    path = folder / "000001.jpg"
    for fault in ("truncated", "bits flipped", "wrong header"):
        for _ in range(inputs):
            bad = damage(jpeg, fault, 4, header, rng)
            path.write_bytes(bad)
            expected = pillow_decode(bad, 16)
            if fault != "bits flipped" and expected is not None and not np.array_equal(expected, original):
                counts["CelebA JPEG", fault]["WRONG: Pillow decodes a cut or re-headed file to another image"] += 1
            test = outcome(lambda: decode_celeba_jpeg(str(path), 16)[0], expected, path, original)
            counts["CelebA JPEG", fault][test] += 1
    return counts


# --- training runs ---


def write_tiny_mnist(folder, n_train=192, n_test=48, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        images = (rng.random((n, 28, 28)) > 0.8).astype(np.uint8) * rng.integers(100, 256, (n, 28, 28), dtype=np.uint8)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes())
    return folder


def launcher(processes):
    if processes == 1:
        return [sys.executable, "train_images.py"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "train_images.py"]


def tiny_flags(folder, data, epochs, processes):
    return ["--data-dir", str(data), "--batch-size", str(64 // processes), "--eval-images", "32", "--iwae-k", "3",
            "--iwae-images", "8", "--log-every", "1", "--epochs", str(epochs), "--logdir", str(folder / "runs"),
            "--out", str(folder / "out")]


def train(args, processes=1, env=None):
    return subprocess.run(launcher(processes) + args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def weights(folder):
    (path,) = (folder / "runs").glob("*/ckpt.pt")
    return load_checkpoint(path)["model"], path


def last_line(text):
    lines = [line for line in text.strip().splitlines() if line.startswith(("error:", "train_images:"))]
    return lines[-1] if lines else "(no line)"


def nan_runs(work, data):
    rows = []
    for hook in ("4", "4:gradients"):
        folder = work / f"nan_{hook.replace(':', '_')}"
        result = train(tiny_flags(folder, data, 2, 1), env={"VAE_INJECT_NAN_AT_STEP": hook})
        state = load_checkpoint(next((folder / "runs").glob("*/ckpt.pt")))
        intact = state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values())
        rows.append((f"VAE_INJECT_NAN_AT_STEP={hook}", result.returncode, len(result.stderr.strip().splitlines()),
                     "loads, step 3 (end of epoch 1), finite" if intact else "DAMAGED", last_line(result.stderr)))
    return rows


def signal_runs(work, data, trials, torchrun_trials, rng):
    """Signals at random moments; each stopped run resumed and compared with the uninterrupted run, bit for bit."""
    rows = []
    for processes, count in ((1, trials), (2, torchrun_trials)):
        straight_folder = work / f"straight_{processes}"
        started = time.time()
        result = train(tiny_flags(straight_folder, data, 3, processes), processes)
        assert result.returncode == 0, result.stderr[-2000:]
        reference, _ = weights(straight_folder)
        span = time.time() - started
        for trial in range(count):
            signum = (signal.SIGTERM, signal.SIGINT)[trial % 2]
            folder = work / f"signal_{processes}_{trial}"
            child = subprocess.Popen(launcher(processes) + tiny_flags(folder, data, 3, processes), cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
            for line in child.stdout:
                if line.startswith("train_images:"):
                    break
            delay = rng.uniform(0, span / 3)  # about as long as the uninterrupted run trained after its start
            time.sleep(delay)
            os.killpg(child.pid, signum)  # the whole process group, as a terminal's Ctrl-C or a scheduler does
            _, stderr = child.communicate()
            stopped = last_line(stderr) if child.returncode else "finished before the signal"
            if child.returncode == 0:
                verdict = "finished first: nothing to resume"
            else:
                _, path = weights(folder)
                resumed = train(["--resume", str(path), "--epochs", "3", "--out", str(folder / "out")], processes)
                final = weights(folder)[0]
                same = resumed.returncode == 0 and all(torch.equal(reference[k], v) for k, v in final.items())
                verdict = "resumed: bit-identical to the uninterrupted run" if same else "RESUMED DIFFERENTLY"
            rows.append((processes, signal.Signals(signum).name, f"{delay:.1f} s", child.returncode, stopped, verdict))
    return rows


SAVE_FOREVER = """
import sys, torch
from common import save_checkpoint
save_checkpoint(sys.argv[1], {"version": 0, "weights": torch.zeros(2**24)})
print("saved", flush=True)
for version in range(1, 10**6):
    save_checkpoint(sys.argv[1], {"version": version, "weights": torch.full((2**24,), float(version))})
"""


def killed_saves(work, trials, rng):
    counts = collections.defaultdict(collections.Counter)
    for trial in range(trials):
        folder = work / f"kill_{trial}"
        folder.mkdir()
        child = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(folder / "ckpt.pt")], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True)
        child.stdout.readline()
        time.sleep(rng.uniform(0.2, 2.0))
        child.kill()
        child.wait()
        child.stdout.close()
        midway = bool(list(folder.glob("ckpt.pt.tmp*")))
        try:
            state = load_checkpoint(folder / "ckpt.pt")
            intact = torch.equal(state["weights"], torch.full((2**24,), float(state["version"])))
            counts["mid-save" if midway else "between saves"][
                "previous checkpoint loads, intact" if intact else "CHECKPOINT MIXED"] += 1
        except SystemExit as error:
            counts["mid-save" if midway else "between saves"][f"UNLOADABLE: {error}"] += 1
        shutil.rmtree(folder)
    return counts


def resume_outcome(path, original, out):
    """--resume path, in this process: refused with one line, or resumed; with which weights."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            train_images.main(train_images.parse_args(["--resume", str(path), "--epochs", "1", "--out", str(out)]))
    except SystemExit as error:
        one_line = isinstance(error.code, str) and error.code.startswith("error: ") and "\n" not in error.code
        return "refused with one line" if one_line else f"REFUSED UNCLEARLY: {error.code!r}"
    except Exception as error:
        return f"UNHANDLED {type(error).__name__}"
    finally:
        for name in (signal.SIGINT, signal.SIGTERM):  # main's handlers: this process still needs Ctrl-C
            signal.signal(name, signal.default_int_handler if name == signal.SIGINT else signal.SIG_DFL)
    loaded = torch.load(path, weights_only=False)["model"]
    same = all(torch.equal(loaded[k], v) for k, v in original.items())
    return "resumed with exactly the original weights" if same else "RESUMED WITH OTHER WEIGHTS"


def damaged_checkpoints(work, data, inputs, rng):
    folder = work / "checkpoint"
    result = train(tiny_flags(folder, data, 1, 1))
    assert result.returncode == 0, result.stderr[-2000:]
    original, path = weights(folder)
    good = path.read_bytes()
    counts = collections.defaultdict(collections.Counter)
    bad = work / "bad.pt"
    for fault in ("truncated", "bits flipped"):
        for _ in range(inputs):
            bad.write_bytes(damage(good, fault, 0, None, rng))
            counts[fault][resume_outcome(bad, original, work / "resumed_out")] += 1
    torch.save({"weights": torch.zeros(3)}, bad)
    counts["another program's file"][resume_outcome(bad, original, work / "resumed_out")] += 1
    state = torch.load(path, weights_only=False)
    state["model"]["encoder.0.weight"] = torch.zeros(3)
    torch.save(state, bad)
    counts["another model's shapes"][resume_outcome(bad, original, work / "resumed_out")] += 1
    return counts, len(good) / 1e6


# --- the report ---


def table(counts, columns):
    """{key (a tuple of len(columns) cells): Counter of outcomes} -> Markdown rows: the key, inputs, outcomes."""
    lines = ["| " + " | ".join(columns) + " | inputs | outcomes |", "|---" * (len(columns) + 2) + "|"]
    for key, outcomes in counts.items():
        cells = "; ".join(f"{n} {label}" for label, n in outcomes.most_common())
        lines.append(f"| {' | '.join(key)} | {sum(outcomes.values())} | {cells} |")
    return lines


def main(args):
    started, rng = time.time(), np.random.default_rng(args.seed)
    work = Path(tempfile.mkdtemp(prefix="reliability_"))
    try:
        data_counts = fuzz_mnist(args.inputs, rng, work / "mnist_fuzz")
        data_counts.update(fuzz_jpeg(args.inputs, rng, work / "jpeg"))
        print(f"reliability: data files done ({time.time() - started:.0f} s)")
        data = write_tiny_mnist(work / "mnist")
        nan = nan_runs(work, data)
        signals = signal_runs(work, data, args.signal_trials, args.torchrun_trials, rng)
        print(f"reliability: NaN and signal runs done ({time.time() - started:.0f} s)")
        kills = killed_saves(work, args.kill_trials, rng)
        checkpoints, checkpoint_mb = damaged_checkpoints(work, data, args.checkpoint_inputs, rng)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    outcomes = collections.Counter()
    for counter in [*data_counts.values(), *kills.values(), *checkpoints.values()]:
        outcomes.update(counter)
    outcomes.update([row[3] for row in nan] + [row[-1] for row in signals])
    unexpected = sorted(label for label in outcomes if label not in EXPECTED)
    cpu = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    command = " ".join(["python", "bench/reliability.py", *sys.argv[1:]])
    lines = [
        "# Reliability: faults injected into train_images.py and its data readers",
        "",
        f"Written by `{command}` in {time.time() - started:.0f} s on {cpu[0] if cpu else 'a CPU'} "
        f"({os.cpu_count()} cores), torch {torch.__version__}, seed {args.seed}: {sum(outcomes.values())} inputs, "
        f"{sum(outcomes[label] for label in unexpected)} with an unexpected outcome"
        + (f" ({', '.join(unexpected)})." if unexpected else "."),
        "",
        "## Damaged data files",
        "",
        "Each file damaged alone in a folder otherwise intact, then read by `load_mnist(folder, 'train')` or "
        "`decode_celeba_jpeg(path, 16)` (a synthetic 89 x 109 JPEG, CelebA's aspect ratio). Truncated: cut at a "
        "uniform random length. Bits flipped: 1 to 4 random bits anywhere. Wrong header: the IDX header replaced by a "
        "random magic number (right, the other kind's, byte-swapped, zero or any) and 0-4 random dimensions; the gzip "
        "header's 10 bytes or the JPEG's first 4 replaced by random bytes (1 JPEG in 5: PNG, GIF, BMP or zero magic). "
        "Expected: DataError with one line naming the file; or, for a raw IDX file that is still valid, exactly what "
        "its bytes hold (a flipped pixel byte is a pixel value); for a gzip stream that still decompresses (its "
        "CRC-32 matches), the original; for a bit-flipped JPEG that still decodes, exactly what Pillow decodes, which "
        "may be another image: JPEG has no checksum, so nothing can tell it from the original.",
        "",
        *table(data_counts, ["file", "fault"]),
        "",
        "The same faults, under hypothesis: `tests/test_data_fuzz.py`.",
        "",
        "## NaN in the loss or the gradients",
        "",
        "2 epochs of 3 steps on a tiny MNIST (192 train images), LV-VAE; the hook poisons step 4's batch (loss) or "
        "one gradient entry after backward (gradients).",
        "",
        "| hook | exit code | stderr lines | checkpoint after the stop | the line |",
        "|---|---|---|---|---|",
        *(f"| `{hook}` | {code} | {n} | {ckpt} | {line} |" for hook, code, n, ckpt, line in nan),
        "",
        "## SIGTERM and SIGINT at random moments, then --resume",
        "",
        "3 epochs of 3 steps (global batch 64) on the same data, run folders under a temporary `<tmp>`; the signal "
        "goes to the whole process group, as a "
        "terminal's Ctrl-C or a scheduler's does, at a uniform random time after the start-up line within a third "
        "of an uninterrupted run's wall time; the stopped run is resumed with `--resume` (under torchrun again for 2 "
        "processes) and its final weights compared with the uninterrupted run's.",
        "",
        "| processes | signal | sent after | exit code | the line | resumed |",
        "|---|---|---|---|---|---|",
        *(f"| {p} | {s} | {d} | {c} | {line} | {v} |" for p, s, d, c, line, v in signals),
        "",
        "## SIGKILL while checkpoints are being saved",
        "",
        "A process saves 64 MB checkpoints in a loop with `common.save_checkpoint` and is killed at a uniform random "
        "time in 0.2-2 s; a temporary file left behind shows that the kill landed in the middle of a save.",
        "",
        *table({(when,): counter for when, counter in kills.items()}, ["killed"]),
        "",
        "## Damaged checkpoints given to --resume",
        "",
        f"A one-epoch run's `ckpt.pt` ({checkpoint_mb:.0f} MB) cut at a uniform random length or with 1-4 random bits "
        "flipped, then `train_images.py --resume` in this process. `load_checkpoint` checks the CRC-32 of every record "
        "of the zip file before `torch.load`, which does not; a flip that gets through hit bytes outside the records "
        "(zip padding, unused header fields), and the weights are the original ones.",
        "",
        *table({(fault,): counter for fault, counter in checkpoints.items()}, ["fault"]),
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines).replace(str(work), "<tmp>") + "\n")
    print(f"reliability: {sum(outcomes.values())} inputs, {len(unexpected)} unexpected outcomes; wrote {args.out}")


if __name__ == "__main__":
    main(parser.parse_args())
