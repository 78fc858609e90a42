"""The evaluated epochs of train_images.py runs: test, training-image and validation ELBO, the selected epoch marked.

Each run folder's TensorBoard events hold, at every evaluated epoch, the one-sample ELBO of the test images
(eval/), of as many training images (eval_train/) and, with --valid-images, of the validation images (eval_valid/);
its ckpt.pt holds the steps an epoch and, with --valid-images, the epoch whose validation ELBO was highest. A run's
record in runs.jsonl holds the same curves (its "curves", recorded since 2026-11-29), so a committed record can be
plotted without its run folder: FILE.jsonl:N names the record on line N, FILE.jsonl every record that has curves.
This plots the three curves per run, one panel each, with that epoch marked: where the test ELBO peaks, how the gap
opens after it, and whether the validation curve follows the test curve. It also prints them as a table.

    python bench/eval_curves.py runs/<run> [runs/<run> ...] --out results/images/early_stopping_curves.png
    python bench/eval_curves.py results/images/runs.jsonl:70 --out curves.png
"""

import argparse
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_images  # noqa: E402  (its setting names)
from common import load_checkpoint, save_figure  # noqa: E402

CURVES = {"eval": "test images", "eval_train": "as many training images", "eval_valid": "validation images"}

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("runs", nargs="+", help="run folders of train_images.py (events and ckpt.pt), or records: "
                    "FILE.jsonl:N (line N, from 1), FILE.jsonl (every record with curves)")
parser.add_argument("--out", required=True, help="the PNG to write")


def panel_title(settings, epochs, images=None, line=None):
    """A panel's title: dataset, setting, likelihood (where discretized: log-probabilities of the 8-bit data),
    training images and epochs; settings: a run's args or record."""
    likelihood = settings.get("likelihood", "continuous")
    return f"{settings['dataset']}, {train_images.setting_name(settings)}, " \
        f"{'' if likelihood == 'continuous' else f'{likelihood} likelihood, '}" \
        f"{f'{images} training images, ' if images else ''}{epochs} epochs" + (f" (line {line})" if line else "")


def read_run(folder):
    """(title, {prefix: [(epoch, nats/image), ...]}, selected epoch or None) of one run folder."""
    events = glob.glob(os.path.join(folder, "events.out.tfevents.*"))
    if not events or not os.path.isfile(os.path.join(folder, "ckpt.pt")):
        raise SystemExit(f"error: {folder} has no TensorBoard events or no ckpt.pt; name a train_images.py run folder")
    state = load_checkpoint(os.path.join(folder, "ckpt.pt"))
    steps_per_epoch = state["step"] / max(state["epoch"], 1)
    curves = {}
    for path in sorted(events):  # a resumed run appends a second file to the same folder
        accumulator = EventAccumulator(path, size_guidance={"scalars": 0})
        accumulator.Reload()
        for prefix in CURVES:
            tag = f"{prefix}/nats_per_image"
            if tag in accumulator.Tags()["scalars"]:
                points = {round(e.step / steps_per_epoch): e.value for e in accumulator.Scalars(tag)}
                curves.setdefault(prefix, {}).update(points)
    if "eval" not in curves:
        raise SystemExit(f"error: {folder}'s events have no evaluated epoch (eval/nats_per_image); let it evaluate")
    selection = state.get("selection")
    return (panel_title(state["args"], state["epoch"], state["args"].get("max_train_images")),
            {k: sorted(v.items()) for k, v in curves.items()}, selection and selection["best"]["epoch"])


def read_records(spec):
    """[(title, {prefix: [(epoch, nats/image), ...]}, selected epoch or None)] of the records FILE.jsonl[:N] names."""
    path, _, line = spec.rpartition(":") if not spec.endswith(".jsonl") else (spec, "", "")
    try:
        with open(path) as f:
            records = [(number, json.loads(text)) for number, text in enumerate(f, 1) if text.strip()]
    except (OSError, ValueError) as failure:
        raise SystemExit(f"error: {path} is not a readable runs.jsonl ({failure}); name a train_images.py record file")
    if line:
        records = [(number, record) for number, record in records if str(number) == line]
        if not records:
            raise SystemExit(f"error: {path} has no record on line {line}; name a line that holds one")
    records = [(number, record) for number, record in records if isinstance(record, dict) and "curves" in record]
    if not records:
        raise SystemExit(f"error: {spec} names no record with curves (runs recorded before 2026-11-29 have none); "
                         "name its run folder instead")
    runs = []
    for number, record in records:
        curves = {prefix: [(row[0], row[1 + i]) for row in record["curves"] if row[1 + i] is not None]
                  for i, prefix in enumerate(CURVES)}
        runs.append((panel_title(record, record["epochs"], record["train_images"], number),
                     {k: v for k, v in curves.items() if v}, record.get("selected", {}).get("epoch")))
    return runs


def main(argv=None):
    args = parser.parse_args(argv)
    runs = []
    for name in args.runs:
        runs += read_records(name) if name.endswith(".jsonl") or ".jsonl:" in name else [read_run(name)]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, (title, curves, selected) in zip(axes[0], runs):
        for prefix, label in CURVES.items():
            if prefix in curves:
                epochs, nats = zip(*curves[prefix])
                ax.plot(epochs, nats, marker="o", markersize=3, label=label)
        if selected is not None:
            ax.axvline(selected, color="gray", linestyle="--", label=f"selected on validation: epoch {selected}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("one-sample ELBO, nats/image")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        print(f"{title}:\n| epoch | " + " | ".join(CURVES[p] for p in curves) + " |")
        table = {p: dict(points) for p, points in curves.items()}
        for epoch in sorted(table["eval"]):
            print(f"| {epoch} | " + " | ".join(f"{table[p].get(epoch, float('nan')):.1f}" for p in curves) + " |")
    fig.tight_layout()
    command = f"python bench/eval_curves.py {' '.join(args.runs)} --out {args.out}"
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    save_figure(fig, args.out, command)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
