"""Where a train_images.py run's generalisation gap lives: the code, sigma, or the residuals.

A run's gap (table2.md) is its one-sample ELBO on as many training images as test images, minus the test ELBO. Under
the continuous likelihood Eq. 11 splits the bound, image by image, into three parts,
    -ELBO = KL(q(z|x) || p(z)) + D (mean log sigma + 1/2 log 2 pi) + sum over pixels of (x - mean)^2 / 2 sigma^2,
so the gap is the sum of the three parts' differences (test minus training): the code's (KL), sigma's (how much
smaller sigma is on the training images) and the standardized residuals' (how much worse the mean fits the test
images, in units of sigma). This loads each run's last checkpoint
(ckpt.pt, the final model when the run finished) and evaluates both bounds as train_images.py does (fp32, one
sample, the same images; sigma-VAE with its training MSE); or it reads a runs.jsonl, whose records (those written
since 2026-11-28) carry each bound's KL and mean log sigma, so that a run whose checkpoint is gone (a GPU's) splits
too, with its record's own numbers, and so does a run's epoch selected on the validation ELBO (--valid-images), as a
row of its own.

    python bench/gap_terms.py runs/<run>/ckpt.pt [runs/<run>/ckpt.pt ...] --out results/images/gap_terms.md
    python bench/gap_terms.py results/images/runs.jsonl --out /tmp/gap_terms.md
"""

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_images  # noqa: E402  (its checkpoint reader, data, model and evaluation: the run's own)
from common import hardware, write_file_atomically  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("checkpoints", nargs="+", help="ckpt.pt files of train_images.py runs (continuous likelihood), "
                    "or runs.jsonl files (each record that carries the split)")
parser.add_argument("--out", required=True, help="the markdown table to write")
parser.add_argument("--seed", type=int, default=1, help="seed of the bounds' noise (default 1, as the final record's)")


def split(result, dims):
    """(ELBO, KL, D (mean log sigma + 1/2 log 2 pi), residuals) in nats/image, from evaluate's one-sample result."""
    log_sigma_part = dims * (result["mean_log_sigma"] + 0.5 * math.log(2 * math.pi))
    residual = -result["nats_per_image"] - result["kl_nats_per_image"] - log_sigma_part
    return result["nats_per_image"], result["kl_nats_per_image"], log_sigma_part, residual


def measure(path, seed):
    """One run: its setting's name, epochs, the test and training images' splits and its gap's parts."""
    given = train_images.parser.parse_args(["--resume", path, "--device", "cpu"])  # the run's settings, on the CPU
    state, args = train_images.read_resume(given, torch.device("cpu"))
    if args.likelihood != "continuous":
        raise SystemExit(f"error: {path} is a {args.likelihood}-likelihood run: Eq. 11's split needs the continuous "
                         "one; leave it out")
    device = torch.device("cpu")
    args.dtype, args.compile = "fp32", "none"
    train_pixels, _, test_pixels = train_images.load_data(args, 0, 1, device)
    model, obs = train_images.make_model(args)
    model.load_state_dict(state["model"]), obs.load_state_dict(state["obs"])
    images = min(args.eval_images or 10000, len(test_pixels))
    if args.sigma == "optimal":  # evaluated with sigma^2 = its model's training MSE, as the run's record
        torch.manual_seed(seed)  # that MSE's z are drawn from the global RNG
        train_images.set_optimal_sigma(model, obs, train_pixels, args, device)
    dims = test_pixels[0].numel()
    with torch.no_grad():
        test = train_images.evaluate(model, obs, test_pixels, args, device, images=images,
                                     generator=torch.Generator().manual_seed(seed))
        seen = train_images.evaluate(model, obs, train_pixels, args, device, images=images,
                                     generator=torch.Generator().manual_seed(seed))
    run = {**vars(args), "train_images": len(train_pixels)}
    return dict(name=train_images.setting_name(run), dataset=args.dataset, seed=args.seed, epochs=state["epoch"],
                images=images, dims=dims, test=split(test, dims), train=split(seen, dims), path=path)


def from_records(path):
    """The runs recorded in a runs.jsonl with the split: continuous likelihood, each bound's KL and mean log sigma."""
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {path} is not a readable runs.jsonl ({e}); name a train_images.py record file")
    rows = []
    for number, run in enumerate(records, 1):
        if run.get("likelihood") == "continuous" and "kl_nats_per_image" in run["final"] and \
                "kl_nats_per_image" in run.get("final_train", {}):
            shape = train_images.ARCHITECTURES[run["dataset"]]
            dims = shape["channels"] * shape["size"] ** 2
            rows.append(dict(name=train_images.setting_name(run), dataset=run["dataset"], seed=run["seed"],
                             epochs=run["epochs"], images="record", dims=dims, test=split(run["final"], dims),
                             train=split(run["final_train"], dims), path=f"{path}, record {number}"))
            chosen = run.get("selected")  # --valid-images: the weights with the best validation ELBO, if not the last
            if chosen and chosen["epoch"] != run["epochs"]:
                rows.append({**rows[-1], "epochs": f"{chosen['epoch']} (selected on validation)",
                             "test": split(chosen["final"], dims), "train": split(chosen["final_train"], dims)})
    return rows


def main(argv=None):
    args = parser.parse_args(argv)
    started = time.time()
    rows = [row for path in args.checkpoints for row in
            (from_records(path) if path.endswith(".jsonl") else [measure(path, args.seed)])]
    command = f"python bench/gap_terms.py {' '.join(args.checkpoints)} --out {args.out}" + (
        f" --seed {args.seed}" if args.seed != 1 else "")
    lines = [
        "# Where the generalisation gap lives: code, sigma or residuals (Eq. 11)",
        "",
        f"Command: `{command}`",
        "",
        (f"Hardware: {hardware(torch.device('cpu'))}; {time.time() - started:.0f} s. Each run's last checkpoint, "
         "evaluated in fp32 with one sample per image on its first test images and as many training images (its "
         "record's count), with noise of its own seed: the figures repeat the record's gap up to that noise, not to "
         "the digit; a row whose images column says record gives that run's record, its own numbers. "
         "-ELBO = KL + D (mean log sigma + 1/2 log 2 pi) + residuals (sum of (x - mean)^2 / 2 sigma^2); the gap "
         "(training ELBO minus test ELBO) = the test-minus-training difference of each part. nats/image."),
        "",
        ("| dataset | setting | seed | epochs | images | test ELBO | training ELBO | gap | its KL part | its log sigma "
         "part | its residual part | KL, test / training | mean log sigma, test / training | residuals, test / "
         "training | checkpoint |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        (test_elbo, *test), (train_elbo, *train) = row["test"], row["train"]
        parts = [a - b for a, b in zip(test, train)]
        log_sigma = [part / row["dims"] - 0.5 * math.log(2 * math.pi) for part in (test[1], train[1])]
        lines.append(
            f"| {row['dataset']} | {row['name']} | {row['seed']} | {row['epochs']} | {row['images']} | "
            f"{test_elbo:.1f} | {train_elbo:.1f} | {train_elbo - test_elbo:.1f} | {parts[0]:.1f} | {parts[1]:.1f} | "
            f"{parts[2]:.1f} | {test[0]:.1f} / {train[0]:.1f} | {log_sigma[0]:.3f} / {log_sigma[1]:.3f} | "
            f"{test[2]:.1f} / {train[2]:.1f} | `{row['path']}` |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_file_atomically(args.out, lambda f: f.write(text.encode()))
    print(text, end="")


if __name__ == "__main__":
    main()
