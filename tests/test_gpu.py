"""GPU tests (`pytest -m gpu`), skipped where there is no CUDA device or Triton's CPU interpreter is on.

The Triton kernel against a float64 reference in fp32 and bf16 (real round-to-nearest bf16, which the interpreter
does not give); short MNIST-format LV-VAE runs with the GPU defaults (whole-step) and reduce-overhead against the
fp32 test ELBO, and resume across the three; five compiled bf16 training steps per sigma mode and dataset (the whole
step as one CUDA graph; reduce-overhead for LV-VAE) against fp32 eager steps;
train_2d.py's whole-step CUDA graphs against its eager steps. Compilation is most of the time: the runs and the step
comparisons run as concurrent processes, so that the file stays within ~2 minutes on one GPU.

    python -m pytest -m gpu tests/test_gpu.py -v
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import train_images
from kernels import gaussian_nll as nll_module
from test_train_images import final_nats, write_tiny_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Up to ten processes compile at once: two Inductor compile workers each, not one per core each.
SHARED_CORES = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "2"}

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1 runs Triton on the CPU; run with TRITON_INTERPRET=0"),
]


def reference64(x, mean, log_sigma):
    """Per-sample NLL (Eq. 11) and its gradients, in float64 from the same (rounded) inputs."""
    x, mean, log_sigma = (t.detach().double().requires_grad_() for t in (x, mean, log_sigma))
    nll = nll_module.gaussian_nll_reference(x, mean, log_sigma)
    return (nll.detach(), *torch.autograd.grad(nll.sum(), (mean, log_sigma)))


@pytest.mark.parametrize("shape", [(64, 1, 28, 28), (32, 3, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_kernel_matches_float64_reference(shape, dtype, channels_last):
    generator = torch.Generator("cuda").manual_seed(0)
    x = torch.rand(shape, generator=generator, device="cuda")
    mean = x + 0.1 * torch.randn(shape, generator=generator, device="cuda")
    log_sigma = -5 * torch.rand(shape, generator=generator, device="cuda")  # sigma in [0.0067, 1]
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x, mean, log_sigma = (t.to(dtype).contiguous(memory_format=layout) for t in (x, mean, log_sigma))
    mean.requires_grad_(), log_sigma.requires_grad_()
    nll = nll_module.gaussian_nll(x, mean, log_sigma, backend="triton")
    grad_mean, grad_log_sigma = torch.autograd.grad(nll.sum(), (mean, log_sigma))
    ref_nll, ref_grad_mean, ref_grad_log_sigma = reference64(x, mean, log_sigma)
    # Forward: fp32 sums of D terms; relative to the sum of |terms| an fp32 sum errs by ~D * 2**-24.
    scale = ref_nll.abs() + x[0].numel()
    assert ((nll.double() - ref_nll).abs() / scale).max().item() < 1e-5
    assert grad_mean.dtype == dtype and grad_mean.is_contiguous(memory_format=layout)
    # Gradients: computed in fp32, rounded once to the dtype. bf16 rounded to nearest errs by at most half a unit in
    # the last place, 2**-8 relative; truncation (the interpreter's) would err by up to 2**-7 and fail this.
    rtol = 2**-8 * 1.01 if dtype == torch.bfloat16 else 1e-5
    for got, want in [(grad_mean, ref_grad_mean), (grad_log_sigma, ref_grad_log_sigma)]:
        error = (got.double() - want).abs()
        assert (error <= rtol * want.abs() + 1e-6 * want.abs().max()).all(), error.max().item()


def test_default_run_reaches_the_fp32_test_elbo_and_resumes_across_configurations(tmp_path):
    # LV-VAE, 2 epochs of 14 steps of 32 images on MNIST-format data (64 of its 512 held out for --valid-images),
    # evaluated after each (so the whole-step graph replays after an evaluation), then the final ELBO on 64 test
    # images: the defaults on a GPU (bf16, the whole step as one CUDA graph) and --compile reduce-overhead against
    # --dtype fp32 --compile none.
    # Measured on an H200 at one epoch: 0.11-0.25 nat/image apart; on the CPU another seed lands ~4 nats away.
    # Tolerance 0.5.
    data = write_tiny_mnist(tmp_path / "mnist", n_train=512, n_test=64)
    flags = lambda name: ["--epochs", "2", "--batch-size", "32", "--eval-images", "64", "--iwae-k", "2",
                          "--iwae-images", "8", "--data-dir", str(data), "--logdir", str(tmp_path / name / "runs"),
                          "--out", str(tmp_path / name / "out"), "--device", "cuda", "--valid-images", "64"]
    configurations = {"fp32": ["--dtype", "fp32", "--compile", "none"], "default": [],
                      "reduce-overhead": ["--compile", "reduce-overhead"]}
    runs = dict(zip(configurations, side_by_side([[*flags(name), *other] for name, other in configurations.items()])))
    for done in runs.values():
        assert done.returncode == 0, done.stderr[-3000:]
    assert "bf16, compile whole-step" in runs["default"].stdout
    assert "bf16, compile reduce-overhead" in runs["reduce-overhead"].stdout
    nats = {name: final_nats(tmp_path / name / "out") for name in configurations}
    print("test ELBO, nats/image: " + ", ".join(f"{name} {value:.3f}" for name, value in nats.items()))
    for name in ["default", "reduce-overhead"]:
        assert abs(nats[name] - nats["fp32"]) < 0.5, nats
    # Each checkpoint continues under another configuration: fp32 -> reduce-overhead -> default -> fp32.
    resumed = side_by_side([["--resume", str(next((tmp_path / source / "runs").glob("*/ckpt.pt"))), "--epochs", "3",
                             "--device", "cuda", *configurations[target]]
                            for source, target in [("fp32", "reduce-overhead"), ("reduce-overhead", "default"),
                                                   ("default", "fp32")]])
    for process in resumed:
        assert process.returncode == 0, process.stderr[-3000:]
    for name in configurations:  # early stopping's weights, kept on the CPU, evaluated again on the GPU at the end
        (record,) = [json.loads(line) for line in (tmp_path / name / "out" / "runs.jsonl").read_text().splitlines()]
        assert [epoch for epoch, _ in record["selected"]["curve"]] == [1, 2]
        assert math.isfinite(record["selected"]["iwae"]["nats_per_image"]) and record["train_images"] == 448


def side_by_side(commands):
    """train_images.py with each argument list, as concurrent processes (compilation is most of their time)."""
    processes = [subprocess.Popen([sys.executable, "train_images.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=SHARED_CORES) for args in commands]
    outputs = [process.communicate(timeout=300) for process in processes]
    return [subprocess.CompletedProcess(p.args, p.returncode, *output) for p, output in zip(processes, outputs)]


# auto: whole-step on one GPU, for every sigma mode and the discretized likelihood; reduce-overhead, the default
# before 2026-11-28, for LV-VAE.
STEP_CASES = [("mnist", sigma, "auto") for sigma in train_images.SIGMA_NAMES] + \
    [("mnist", "learned", "auto", "discretized"), ("celeba", "learned", "auto"),
     ("mnist", "learned", "reduce-overhead"), ("celeba", "learned", "reduce-overhead")]


def compiled_and_eager_losses(dataset, sigma, compile_mode, likelihood="continuous"):
    """Five steps from the same weights, batch and noise: bf16 autocast, channels_last and --compile compile_mode
    (auto, i.e. whole-step: three eager warm-up steps, record, replay; reduce-overhead: CUDA graphs warm up, record,
    replay) against fp32 eager. Returns {"fp32": [5 losses], "compiled": [5 losses]}."""
    device = torch.device("cuda")
    arch = train_images.ARCHITECTURES[dataset]
    pixels = torch.randint(0, 256, (128, arch["channels"], arch["size"], arch["size"]), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    losses = {}
    for name, flags in [("fp32", ["--dtype", "fp32", "--compile", "none"]), ("compiled", ["--compile", compile_mode])]:
        args = train_images.parse_args(["--dataset", dataset, "--sigma", sigma, "--likelihood", likelihood,
                                        "--device", "cuda", *flags])
        train_images.resolve_defaults(args, device, 1)
        torch.manual_seed(0)
        model, obs, step_module, optimizer = train_images.build(args, device)
        assert not torch.backends.cudnn.allow_tf32  # fp32 layers are fp32, not TF32
        guard = train_images.NanGuard(optimizer, 0, device)
        eps = torch.randn(128, model.latent_dim, generator=torch.Generator().manual_seed(1)).to(device)
        step = train_images.step_function(args)
        losses[name] = [step(step_module, optimizer, guard, pixels, eps, args.compile == "reduce-overhead")[0].item()
                        for _ in range(5)]
    return losses


@pytest.fixture(scope="module", autouse=True)
def step_comparisons():
    """compiled_and_eager_losses of every case, each in its own process, started with the module's first test: the
    compilations (most of these tests' time) run side by side on the machine's cores while the other tests run."""
    code = "import json, sys; sys.path[:0] = ['.', 'tests']; import test_gpu; " \
           "print(json.dumps(test_gpu.compiled_and_eager_losses(*sys.argv[1:])))"
    processes = {case: subprocess.Popen([sys.executable, "-c", code, *case], cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=SHARED_CORES) for case in STEP_CASES}
    yield processes
    for process in processes.values():
        process.kill()


@pytest.mark.parametrize("case", STEP_CASES, ids="-".join)
def test_compiled_bf16_steps_follow_the_fp32_eager_steps(step_comparisons, case):
    # bf16 activations move a loss of hundreds of nats per image by well under 1% (measured on an H200: 2e-5
    # relative at the first step); tolerance 1% at each of the five steps.
    stdout, stderr = step_comparisons[case].communicate(timeout=300)
    assert step_comparisons[case].returncode == 0, stderr[-3000:]
    losses = json.loads(stdout.strip().splitlines()[-1])
    print(f"{case}: fp32 {losses['fp32']}, compiled {losses['compiled']}")
    for fp32, compiled in zip(losses["fp32"], losses["compiled"]):
        assert abs(compiled - fp32) < 0.01 * abs(fp32), losses


def test_train_2d_cuda_graph_steps_follow_the_eager_steps(tmp_path):
    # Every kind of row in both phases (F, LS, sigma-VAE, LV, the warm start handing over at step 101, F-sched
    # replaying LS's sigma in place), 2 seeds x 300 steps: each ensemble's whole step replayed as one CUDA graph
    # against the same steps run eagerly. The same kernels on the same inputs; tolerance 1e-4 relative.
    import time

    import train_2d
    from common import FixedSigma, LearnedPerDimSigma, LearnedScalarSigma, OptimalSigma, ScheduledSigma

    runs = {}
    for mode in ["off", "on"]:
        args = train_2d.parse_args(["--device", "cuda", "--cuda-graphs", mode, "--steps", "300", "--seeds", "2",
                                    "--hidden", "32", "--lv-warmup", "100", "--log-every", "10",
                                    "--logdir", str(tmp_path / mode), "--out", str(tmp_path / mode)])
        seeds = [0, 1]
        groups = [("F-VAE sigma=0.1", FixedSigma(torch.full((2, 1, 1), 0.1))),
                  ("LS-VAE", LearnedScalarSigma((2, 1, 1))), ("sigma-VAE", OptimalSigma((2, 1, 1))),
                  ("LV-VAE", LearnedPerDimSigma(dim=-1)),
                  ("LV-VAE, warm start", train_2d.WarmStartSigma(2)),
                  ("LV-VAE, warm start (sigma-VAE)", train_2d.WarmStartSigma(2, warm="optimal"))]
        started = time.time()
        phase1 = train_2d.Ensemble(groups, seeds, args, "cuda")
        history, schedule = train_2d.train([phase1], seeds, args, "cuda", f"phase 1, graphs {mode}")
        phase2 = train_2d.Ensemble([("F-sched", ScheduledSigma(schedule.reshape(len(schedule), -1, 1, 1)))],
                                   [10000, 10001], args, "cuda")
        history.update(train_2d.train([phase2], [10000, 10001], args, "cuda", f"phase 2, graphs {mode}")[0])
        torch.cuda.synchronize()
        print(f"train_2d, --cuda-graphs {mode}: 2 x 300 steps in {time.time() - started:.1f} s")
        assert (phase1.graphed_step is not None) == (phase2.graphed_step is not None) == (mode == "on")
        runs[mode] = history, [p.detach().cpu() for ens in (phase1, phase2) for p in ens.model.parameters()]
    (eager, eager_weights), (graphed, graphed_weights) = runs["off"], runs["on"]
    assert graphed["LV-VAE, warm start"]["handover_step"].tolist() == [101, 101]
    assert graphed["LV-VAE, warm start (sigma-VAE)"]["handover_step"].tolist() == [101, 101]
    for name in eager:
        for key in ["elbo", "recon_nll", "kl", "log_sigma"]:
            torch.testing.assert_close(torch.as_tensor(graphed[name][key]), torch.as_tensor(eager[name][key]),
                                       rtol=1e-4, atol=1e-4, msg=f"{name} {key}")
    for got, want in zip(graphed_weights, eager_weights):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
