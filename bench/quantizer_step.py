"""One training step of a vector quantizer, or of a residual stack of them, per provider, and its peak memory measured
in a fresh process.

A step is what the quantizer costs a VQ-VAE training iteration: the forward pass in train mode (search, commitment
loss, EMA update of the codebook, dead-code restarts where the provider has them; every layer's, for a stack), then
the backward pass of the commitment loss (summed over the layers) plus a stand-in for the decoder's loss (the mean
square of the quantized output), so that the straight-through gradient reaches the input as it does in training.
x is (B, 1024, D): B images of 32 x 32 latents, channels last, which every quantizer takes without a transpose.

Providers (`layers` None: one quantizer; an int: a residual stack of that many)
  torch, triton-exact, triton-fast  vqvae.quantizer.VectorQuantizer, or vqvae.quantizer.residual.ResidualVectorQuantizer
                                    with its layers' defaults, with backend "torch" or "triton"
  compile-torch                     the torch backend under torch.compile
  torch-peer-ema                    the torch backend with the peer's EMA, as the adapters run it: a constant decay,
                                    no re-parameterisation, no dead-code restarts
  vector-quantize-pytorch           vector_quantize_pytorch.VectorQuantize, or ResidualVQ, with the same settings: EMA
                                    on, decay 0.99, eps 1e-5, commitment weight 0.25, k-means init off, and the plain
                                    straight-through estimator (rotation_trick=False), which is what ours do. It has
                                    no dead-code restarts at these settings, and builds the N x K distance matrix and
                                    a one-hot per layer.

`python -m bench.quantizer_step --provider torch --n 16384 --k 4096 --d 256 [--layers 8]` prints, as JSON, the peak
memory of one step in this (fresh) process: see `measure_peak_memory`.
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():  # a fresh process: bench/conftest.py has not run here
    os.environ.setdefault("TRITON_INTERPRET", "1")

OURS = ("torch", "triton-exact", "triton-fast", "compile-torch", "torch-peer-ema")
PROVIDERS = (*OURS, "vector-quantize-pytorch")
DECAY, EPS, COMMITMENT = 0.99, 1e-5, 0.25
LATENTS_PER_IMAGE = 32 * 32
PEER_EMA = {"ema_warmup": False, "fit_weight_steps": 1, "affine_reparam": False, "dead_code_threshold": 0.0}


def make_forward(provider: str, k: int, d: int, device: str, layers: int | None = None, options: dict | None = None):
    """The provider's quantizer (layers None) or residual stack (layers an int) in train mode, as a function
    forward(inputs) -> (quantized, loss). options: further keywords for our quantizers (e.g. `learning`)."""
    if options and provider not in OURS:
        raise ValueError(f"options {options} are for our quantizers ({', '.join(OURS)}), not {provider}")
    if provider == "vector-quantize-pytorch":
        from vector_quantize_pytorch import ResidualVQ, VectorQuantize  # noqa: PLC0415

        settings = {"dim": d, "codebook_size": k, "decay": DECAY, "eps": EPS, "commitment_weight": COMMITMENT,
                    "kmeans_init": False, "rotation_trick": False}
        module = VectorQuantize(**settings) if layers is None else ResidualVQ(num_quantizers=layers, **settings)
        module = module.to(device).train()

        def forward(inputs):
            quantized, _, loss = module(inputs)
            return quantized, loss.sum()  # ResidualVQ: one loss per layer

        return forward
    if provider not in OURS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    from vqvae.quantizer import VectorQuantizer  # noqa: PLC0415
    from vqvae.quantizer.residual import ResidualVectorQuantizer  # noqa: PLC0415

    kwargs = {"decay": DECAY, "eps": EPS, "commitment_weight": COMMITMENT,
              "backend": "triton" if provider.startswith("triton-") else "torch",
              "precision": "fast" if provider == "triton-fast" else "exact",
              **(PEER_EMA if provider == "torch-peer-ema" else {}), **(options or {})}
    if layers is None:
        module = VectorQuantizer(k, d, **kwargs)
    else:
        module = ResidualVectorQuantizer(layers, k, d, **kwargs)
    module = module.to(device).train()
    model = torch.compile(module) if provider == "compile-torch" else module

    def forward(inputs):
        out = model(inputs)
        return out.quantized, out.loss

    return forward


def make_step(provider: str, n: int, k: int, d: int, device: str, layers: int | None = None,
              options: dict | None = None):
    """A function that runs one training step on a fixed batch of n random vectors (its own module state)."""
    per_image = LATENTS_PER_IMAGE if n % LATENTS_PER_IMAGE == 0 else n
    x = torch.randn(n // per_image, per_image, d, device=device)
    forward = make_forward(provider, k, d, device, layers, options)

    def step():
        inputs = x.detach().requires_grad_()
        quantized, loss = forward(inputs)
        (quantized.square().mean() + loss).backward()

    return step


# -- peak memory in a fresh process ----------------------------------------------------------------------------


def proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process; Linux >= 4.0."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak_memory(provider: str, n: int, k: int, d: int, device: str = "cpu", layers: int | None = None) -> dict:
    """Peak memory of one steady-state step, measured two ways (meant for a fresh process: see the caller).

    tensor_peak_bytes  bytes of tensors allocated during the step and live at its peak: on CUDA the caching
                       allocator's high-water mark; on the CPU the profiler's allocation events replayed
                       (`bench.harness.cpu_tensor_peak`). This is the figure the targets are checked on.
    rss_peak_bytes     on the CPU, what the process's resident set rose to during the step above its level before
                       it: the high-water mark is reset just before the step, and glibc is told (by the caller's
                       MALLOC_MMAP_THRESHOLD_) to give every allocation of 64 KiB or more its own mapping, returned
                       to the kernel when freed, so that the resident set follows the live tensors instead of a heap
                       that only grows. It counts everything else too (library workspaces, the autograd graph).
    Two steps run first: the first initialises the codebook and allocates lazily-created state.
    """
    from bench import harness  # noqa: PLC0415

    step = make_step(provider, n, k, d, device, layers)
    step()
    step()
    result = {"provider": provider, "layers": layers, "n": n, "k": k, "d": d, "device": device}
    if device == "cuda":
        result["tensor_peak_bytes"] = harness.peak_memory(step)[0]
        return result
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if reset_peak_rss():
        before = proc_status_bytes("VmRSS")
        step()
        result["rss_peak_bytes"] = proc_status_bytes("VmHWM") - before
    result["tensor_peak_bytes"] = harness.cpu_tensor_peak(step)
    return result


def peak_memory_in_fresh_process(provider: str, n: int, k: int, d: int, device: str = "cpu",
                                 layers: int | None = None) -> dict:
    """Run measure_peak_memory in a new Python process, so no other benchmark's allocations or caches count."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "bench.quantizer_step", "--provider", provider,
               "--n", str(n), "--k", str(k), "--d", str(d), "--device", device]
    command += [] if layers is None else ["--layers", str(layers)]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Peak memory of one quantizer training step, as JSON.")
    parser.add_argument("--provider", choices=PROVIDERS, required=True)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--layers", type=int, default=None, help="a residual stack of this many quantizers")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(json.dumps(measure_peak_memory(args.provider, args.n, args.k, args.d, args.device, args.layers)))


if __name__ == "__main__":
    main()
