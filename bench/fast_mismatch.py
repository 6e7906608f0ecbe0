"""How often the `fast` search picks a code that is not the fp64-nearest one, and by how much it misses.

    python -m bench.fast_mismatch                                   # random data at the seed shape
    python -m bench.fast_mismatch --checkpoint runs/quickstart/best.pt   # + real encoder outputs of a checkpoint

On CUDA it runs the Triton kernel itself (`--impl kernel`). Without CUDA the kernel runs in Triton's interpreter
(fp16-rounded operands, fp32 accumulation: the GPU's arithmetic up to summation order), which is slow at K = 4096,
so there the default is `--impl emulated`: centre on the codebook mean, scale by powers of two and round the
operands to fp16 as the kernel does, multiply exactly, accumulate in fp64. The emulation leaves out the fp32 accumulation error, so it agrees with the kernel on
~99% of rows and undercounts the misses somewhat (they are near-ties, where that error decides).

Reported per data set: the fraction of rows whose chosen code is not the fp64-nearest one, and the excess distance
d(chosen) - d(nearest), relative to d(nearest), at its median over the missed rows and at its worst.
"""

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fp16(v: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """v rounded as the kernels round their operands: scaled by the power of two that puts amax in [2**13, 2**14),
    rounded to fp16, scaled back (fp64)."""
    scale = torch.exp2(14.0 - torch.frexp(amax.float()).exponent.double())
    return (v * scale).half().double() / scale


def emulated_fast_indices(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The fast kernel's choice, replayed: fp16-rounded centred operands, exact products, fp64 sums."""
    center = codebook.float().mean(0)
    codes = codebook.float() - center
    code_sqnorm = codes.double().square().sum(1)
    codes_fp16 = _fp16(codes.double(), codes.abs().amax())
    out = []
    for start in range(0, x.shape[0], chunk):
        rows = (x[start : start + chunk].float() - center).double()
        rows = _fp16(rows, rows.abs().amax(dim=1, keepdim=True))
        out.append((code_sqnorm[None] - 2 * rows @ codes_fp16.T).argmin(1))
    return torch.cat(out)


def miss_report(x: torch.Tensor, codebook: torch.Tensor, chosen: torch.Tensor, chunk: int = 4096) -> dict:
    missed, excess = 0, []
    for start in range(0, x.shape[0], chunk):
        rows = x[start : start + chunk].double()
        dist = torch.cdist(rows, codebook.double()).square()
        best = dist.min(1).values
        got = dist.gather(1, chosen[start : start + chunk, None].to(dist.device)).squeeze(1)
        miss = got > best
        missed += int(miss.sum())
        excess.append(((got - best) / best.clamp(min=1e-30))[miss])
    excess = torch.cat(excess)
    return {"rows": x.shape[0], "missed": missed, "missed_fraction": missed / x.shape[0],
            "median_relative_excess": float(excess.median()) if excess.numel() else 0.0,
            "max_relative_excess": float(excess.max()) if excess.numel() else 0.0}


def fast_indices(x: torch.Tensor, codebook: torch.Tensor, impl: str) -> torch.Tensor:
    if impl == "kernel":
        import vq_kernels  # noqa: PLC0415

        return vq_kernels.nearest_code(x, codebook, "fast")[0]
    return emulated_fast_indices(x, codebook)


def encoder_rows(checkpoint: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder outputs (before quantization) of the checkpoint's training images (fixed crops), and its codebook."""
    from vqvae.data import make_datasets, make_loader  # noqa: PLC0415
    from vqvae.resume import load_model  # noqa: PLC0415

    model, cfg, _ = load_model(checkpoint)
    images_set, _ = make_datasets(cfg.data, cfg.train.seed, augment=False)
    rows = []
    with torch.no_grad():
        for images in make_loader(images_set, cfg.train.batch_size, num_workers=0, train=False):
            z = model.pre_quant(model.encoder(images))
            rows.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
            if sum(r.shape[0] for r in rows) >= n:
                break
    return torch.cat(rows)[:n], model.quantizer.codebook.codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--impl", choices=("kernel", "emulated"),
                        default="kernel" if torch.cuda.is_available() else "emulated")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    sets = {"random normal": (torch.randn(args.n, args.d), torch.randn(args.k, args.d))}
    if args.checkpoint:
        sets[f"encoder outputs of {args.checkpoint}"] = encoder_rows(args.checkpoint, args.n)
    for name, (x, codebook) in sets.items():
        x, codebook = x.to(device), codebook.to(device)
        report = miss_report(x, codebook, fast_indices(x, codebook, args.impl))
        print(f"{name} (N={x.shape[0]}, K={codebook.shape[0]}, D={x.shape[1]}, {args.impl}): "
              f"{report['missed']} rows missed ({report['missed_fraction']:.4%}); relative excess median "
              f"{report['median_relative_excess']:.2e}, max {report['max_relative_excess']:.2e}")


if __name__ == "__main__":
    main()
