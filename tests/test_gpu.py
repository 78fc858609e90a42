"""GPU tests (`pytest -m gpu`), skipped where there is no CUDA device or Triton's CPU interpreter is on.

The Triton kernel against a float64 reference in fp32 and bf16 (real round-to-nearest bf16, which the interpreter
does not give); one compiled training step per sigma mode (bf16, CUDA graphs) against the fp32 eager step's loss;
a short MNIST-format LV-VAE run on the fast path against the fp32 path's test ELBO; resume across the two paths.

    TRITON_INTERPRET=0 python -m pytest -m gpu tests/test_gpu.py -v
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


def test_fast_path_run_reaches_the_fp32_test_elbo_and_resumes_across_paths(tmp_path):
    # LV-VAE, 16 steps of 32 images on MNIST-format data, then the final ELBO on 64 test images. On the CPU the two
    # paths agreed within 0.02 nats/image and another seed lands ~4 nats away: tolerance 0.5 nat/image.
    data = write_tiny_mnist(tmp_path / "mnist", n_train=512, n_test=64)
    flags = lambda name: ["--epochs", "1", "--batch-size", "32", "--eval-images", "64", "--iwae-k", "2",
                          "--iwae-images", "8", "--data-dir", str(data), "--logdir", str(tmp_path / name / "runs"),
                          "--out", str(tmp_path / name / "out"), "--device", "cuda"]
    eager = run([*flags("eager"), "--fast", "off"])
    assert eager.returncode == 0, eager.stderr[-3000:]
    fast = run([*flags("fast"), "--fast", "on"])
    assert fast.returncode == 0, fast.stderr[-3000:]
    eager_nats, fast_nats = final_nats(tmp_path / "eager" / "out"), final_nats(tmp_path / "fast" / "out")
    print(f"test ELBO: eager fp32 {eager_nats:.3f}, fast {fast_nats:.3f} nats/image")
    assert abs(fast_nats - eager_nats) < 0.5, (fast_nats, eager_nats)
    # fp32 eager checkpoint -> fast path (fused Adam needs its step counts on the GPU), and the other way round.
    for source, path in [("eager", "on"), ("fast", "off")]:
        (ckpt,) = (tmp_path / source / "runs").glob("*/ckpt.pt")
        resumed = run(["--resume", str(ckpt), "--epochs", "2", "--fast", path, "--device", "cuda",
                       "--out", str(tmp_path / source / "out")])
        assert resumed.returncode == 0, resumed.stderr[-3000:]


@pytest.mark.parametrize("sigma", list(train_images.SIGMA_NAMES))
@pytest.mark.parametrize("dataset", ["mnist", "celeba"])
def test_compiled_bf16_step_matches_the_fp32_eager_step(dataset, sigma):
    # The first step's loss from the same weights and batch: the fast path (bf16 autocast, channels_last,
    # torch.compile with CUDA graphs, the fused kernel) against fp32 eager. bf16 activations move a loss of a few
    # hundred nats per image by well under 1%; tolerance 1% relative.
    arch = train_images.ARCHITECTURES[dataset]
    pixels = torch.randint(0, 256, (128, arch["channels"], arch["size"], arch["size"]), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).cuda()
    losses = {}
    for fast in ["off", "on"]:
        args = train_images.parse_args(["--dataset", dataset, "--sigma", sigma, "--device", "cuda", "--fast", fast])
        torch.manual_seed(0)
        model, obs, train_elbo, optimizer = train_images.build_training(args, torch.device("cuda"))
        mode = train_images.compile_mode(args, torch.device("cuda"))
        eps = torch.randn(128, model.latent_dim, generator=torch.Generator().manual_seed(1)).cuda()
        x = train_images.training_batch(pixels, torch.arange(128, device="cuda"), fast == "on")
        for _ in range(3):  # CUDA graphs record on the second call and replay from the third
            loss, _, _, _ = train_images.forward_backward(train_elbo, optimizer, x, eps, mode)
            losses[fast] = loss.item()
        torch._dynamo.reset()
    print(f"{dataset} {sigma}: eager {losses['off']:.4f}, fast {losses['on']:.4f}")
    assert abs(losses["on"] - losses["off"]) < 0.01 * abs(losses["off"]), losses
