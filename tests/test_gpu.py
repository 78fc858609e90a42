"""GPU tests (`pytest -m gpu`), skipped where there is no CUDA device or Triton's CPU interpreter is on.

The Triton kernel against a float64 reference in fp32 and bf16 (real round-to-nearest bf16, which the interpreter
does not give); a short MNIST-format LV-VAE run with the GPU defaults against the fp32 test ELBO, and resume across
the two; three compiled bf16 training steps per sigma mode and dataset (CUDA graphs) against fp32 eager steps.

    python -m pytest -m gpu tests/test_gpu.py -v
"""

import os

import pytest
import torch

import train_images
from kernels import gaussian_nll as nll_module
from test_train_images import final_nats, run, write_tiny_mnist

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
    # LV-VAE, 16 steps of 32 images on MNIST-format data, then the final ELBO on 64 test images: the defaults on a GPU
    # (bf16, CUDA graphs, the fused kernel) against --dtype fp32 --compile none. Measured on an H200: 0.25 nat/image
    # apart; on the CPU another seed lands ~4 nats away. Tolerance 0.5 nat/image.
    data = write_tiny_mnist(tmp_path / "mnist", n_train=512, n_test=64)
    flags = lambda name: ["--epochs", "1", "--batch-size", "32", "--eval-images", "64", "--iwae-k", "2",
                          "--iwae-images", "8", "--data-dir", str(data), "--logdir", str(tmp_path / name / "runs"),
                          "--out", str(tmp_path / name / "out"), "--device", "cuda"]
    fp32 = run([*flags("fp32"), "--dtype", "fp32", "--compile", "none"])
    assert fp32.returncode == 0, fp32.stderr[-3000:]
    default = run(flags("default"))
    assert default.returncode == 0, default.stderr[-3000:]
    assert "bf16, compile reduce-overhead" in default.stdout
    fp32_nats, default_nats = final_nats(tmp_path / "fp32" / "out"), final_nats(tmp_path / "default" / "out")
    print(f"test ELBO: fp32 eager {fp32_nats:.3f}, default {default_nats:.3f} nats/image")
    assert abs(default_nats - fp32_nats) < 0.5, (default_nats, fp32_nats)
    for source, other in [("fp32", []), ("default", ["--dtype", "fp32", "--compile", "none"])]:
        (ckpt,) = (tmp_path / source / "runs").glob("*/ckpt.pt")
        resumed = run(["--resume", str(ckpt), "--epochs", "2", "--device", "cuda", *other])
        assert resumed.returncode == 0, resumed.stderr[-3000:]


@pytest.mark.parametrize("dataset, sigma", [("mnist", sigma) for sigma in train_images.SIGMA_NAMES] +
                         [("celeba", "learned")])
def test_compiled_bf16_steps_follow_the_fp32_eager_steps(dataset, sigma):
    # Three steps from the same weights, batch and noise: the defaults (bf16 autocast, channels_last, CUDA graphs:
    # warm-up, record, replay) against fp32 eager. bf16 activations move a loss of hundreds of nats per image by well
    # under 1% (measured on an H200: 2e-5 relative at the first step); tolerance 1% at each step.
    device = torch.device("cuda")
    arch = train_images.ARCHITECTURES[dataset]
    pixels = torch.randint(0, 256, (128, arch["channels"], arch["size"], arch["size"]), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    losses = {}
    for name, flags in [("fp32", ["--dtype", "fp32", "--compile", "none"]), ("default", [])]:
        args = train_images.parse_args(["--dataset", dataset, "--sigma", sigma, "--device", "cuda", *flags])
        train_images.resolve_defaults(args, device, 1)
        torch.manual_seed(0)
        model, obs, step_module, optimizer = train_images.build(args, device)
        assert not torch.backends.cudnn.allow_tf32  # fp32 layers are fp32, not TF32
        guard = train_images.NanGuard(optimizer, 0, device)
        eps = torch.randn(128, model.latent_dim, generator=torch.Generator().manual_seed(1)).to(device)
        losses[name] = [train_images.train_step(step_module, optimizer, guard, pixels, eps,
                                                args.compile == "reduce-overhead")[0].item() for _ in range(3)]
        torch._dynamo.reset()
    print(f"{dataset} {sigma}: fp32 {losses['fp32']}, default {losses['default']}")
    for fp32, default in zip(losses["fp32"], losses["default"]):
        assert abs(default - fp32) < 0.01 * abs(fp32), losses
