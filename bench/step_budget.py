"""What one steady training step of the quantizer asks of the device, counted on the CPU: kernel launches and bytes
moved. A GPU step that is bound by its host's launches or by its passes over the batch shows here first.

    python -m bench.step_budget [--n 65536 --k 4096 --d 256] [--precision exact] [--learning ema] [--layers L]

The step is the quantizer's own: its forward in train mode (search, commitment loss, codebook update, every health
rule) and its backward from an upstream gradient on the quantized output, as a decoder would send it
(`quantizer_step`). The caller's loss is not part of it.

launches  the step on the CPU with the Triton backend under its interpreter, at a small shape (LAUNCH_SHAPE: the
          count does not depend on the shape; a test checks two), recorded by torch.profiler: every PyTorch op that does work and runs inside no other op
          (views, allocations and `detach` are not work; `to`, `reshape`, `contiguous` count only when they copy;
          a `vq_kernels` custom op counts by what it runs inside, not itself), plus every Triton launch. On a GPU
          each is at least one kernel launch.
bytes     the same step on the meta device at the full shape (the module's state moved there after a warm-up on
          the CPU by the PyTorch backend): every op's tensor operands and results, each counted once, views excluded, custom ops through
          their fakes. A lower bound on the traffic of eager PyTorch (each op reads its operands and writes its
          results at least once; caches aside), and what fusion would save. Running on meta at all shows that the
          step reads nothing back on the host and has no data-dependent shape: a meta tensor holds no values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

SEED_SHAPE = (65536, 4096, 256)  # N, K, D
LAUNCH_SCOPE = "triton::launch "
# Ops that do no work on a device: views, allocations, metadata.
NO_WORK = {
    "view", "_unsafe_view", "as_strided", "slice", "select", "expand", "permute", "transpose", "t", "unsqueeze",
    "squeeze", "detach", "alias", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "unbind",
    "split", "split_with_sizes", "chunk", "narrow", "diagonal", "unfold", "lift_fresh", "_reshape_alias",
    "resolve_conj", "resolve_neg", "result_type", "size", "stride", "numel", "dim", "is_same_size", "set_",
    "view_as", "expand_as", "flatten", "unflatten", "movedim", "swapaxes", "_to_dense", "_has_compatible_shallow_copy_type",
}
# Ops that do work only through an op they call (a copy when they must make one).
COPY_IF_NEEDED = {"to", "reshape", "contiguous", "type_as", "_to_copy"}


# -- the step ---------------------------------------------------------------------------------------------------

def make_quantizer(k: int, d: int, device, layers: int | None = None, **options):
    from vqvae.quantizer import ResidualVectorQuantizer, VectorQuantizer  # noqa: PLC0415

    options = {"backend": "triton", **options}
    module = VectorQuantizer(k, d, **options) if layers is None else ResidualVectorQuantizer(layers, k, d, **options)
    return module.to(device).train()


def quantizer_step(module, x: torch.Tensor, upstream: torch.Tensor):
    """One training step of the quantizer alone: forward, then backward from `upstream`, the gradient a decoder
    would send back into the quantized output (and 1 into the quantizer's own loss)."""
    inputs = x.detach().requires_grad_()
    out = module(inputs)
    torch.autograd.backward([out.quantized, out.loss], [upstream, torch.ones_like(out.loss)])
    return inputs.grad


def warmed_up(k: int, d: int, layers=None, steps: int = 3, rows: int = 256, backend: str = "triton", **options):
    """The quantizer past its first steps (codebook seeded, warm-ups begun) on the CPU, at `rows` rows a batch."""
    module = make_quantizer(k, d, "cpu", layers, backend=backend, **options)
    for _ in range(steps):
        x = torch.randn(1, rows, d)
        quantizer_step(module, x, torch.randn_like(x))
    return module


# -- launches ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def triton_launches_scoped():
    """Every Triton launch runs inside a profiler scope named after its kernel (under the interpreter, whose grid
    loop runs PyTorch ops of its own that are not the kernel's launches)."""
    from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415

    classes = [InterpretedFunction, triton.runtime.jit.JITFunction]
    saved = {cls: cls.run for cls in classes}

    def scoped(original):
        def run(self, *args, **kwargs):
            with torch.profiler.record_function(LAUNCH_SCOPE + getattr(self, "__name__", "kernel")):
                return original(self, *args, **kwargs)
        return run

    for cls in classes:
        cls.run = scoped(saved[cls])
    try:
        yield
    finally:
        for cls in classes:
            cls.run = saved[cls]


def counted_ops(event) -> list[str]:
    """The work under one profiler event (see the module docstring): names of the ops and Triton launches."""
    name = event.name
    if name.startswith(LAUNCH_SCOPE):
        return [name.removeprefix("triton::launch ").strip() + " (triton)"]
    if name.startswith("aten::"):
        op = name.removeprefix("aten::")
        if op in NO_WORK:
            return []
        if op not in COPY_IF_NEEDED:
            return [name]
    return [n for child in event.cpu_children for n in counted_ops(child)]


def launches(step) -> list[str]:
    """The counted ops and launches of one call of `step`, in order."""
    with triton_launches_scoped(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    tops = sorted((e for e in prof.events() if e.cpu_parent is None), key=lambda e: e.time_range.start)
    return [n for event in tops for n in counted_ops(event)]


# -- bytes ------------------------------------------------------------------------------------------------------

def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class ByteCounter(TorchDispatchMode):
    """Sums, per op, the bytes of its distinct tensor operands and results (views: none)."""

    def __init__(self):
        super().__init__()
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not _is_view(func) and func.__name__.split(".")[0] not in NO_WORK:
            tensors = {id(t): t for t in torch.utils._pytree.tree_leaves((args, kwargs, out))
                       if isinstance(t, torch.Tensor)}
            moved = sum(t.numel() * t.element_size() for t in tensors.values())
            key = str(func.overloadpacket)
            self.by_op[key] = self.by_op.get(key, 0) + moved
        return out


def bytes_moved(k: int, d: int, n: int, layers=None, **options) -> ByteCounter:
    """The step's bytes at n rows, on the meta device, of a Triton-backed quantizer whose state was warmed up by the
    PyTorch backend on the CPU (the same state; the interpreter would take minutes at full size)."""
    module = make_quantizer(k, d, "cpu", layers, **options)
    module.load_state_dict(warmed_up(k, d, layers, backend="torch", **options).state_dict())
    module.to("meta")
    per_image = 1024 if n % 1024 == 0 else n
    x = torch.empty(n // per_image, per_image, d, device="meta")
    counter = ByteCounter()
    with counter:
        quantizer_step(module, x, torch.empty_like(x))
    return counter


# -- report -----------------------------------------------------------------------------------------------------

LAUNCH_SHAPE = (256, 64, 16)  # rows, codes, dims of the launch count's run under the interpreter


def count_launches(layers=None, shape=LAUNCH_SHAPE, **options) -> list[str]:
    rows, k, d = shape
    module = warmed_up(k, d, layers, rows=rows, **options)
    x = torch.randn(1, rows, d)
    upstream = torch.randn_like(x)
    return launches(lambda: quantizer_step(module, x, upstream))


def budget(n: int, k: int, d: int, layers=None, **options) -> dict:
    ops = count_launches(layers, **options)
    counter = bytes_moved(k, d, n, layers, **options)
    return {"n": n, "k": k, "d": d, "layers": layers, "options": options, "launches": len(ops),
            "triton_launches": sum(op.endswith("(triton)") for op in ops), "ops": ops,
            "bytes": sum(counter.by_op.values()),
            "bytes_by_op": dict(sorted(counter.by_op.items(), key=lambda kv: -kv[1]))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=SEED_SHAPE[0])
    parser.add_argument("--k", type=int, default=SEED_SHAPE[1])
    parser.add_argument("--d", type=int, default=SEED_SHAPE[2])
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--precision", default="exact", choices=("exact", "fast"))
    parser.add_argument("--learning", default="ema")
    parser.add_argument("--json", action="store_true", help="everything, as JSON")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = budget(args.n, args.k, args.d, args.layers, precision=args.precision, learning=args.learning)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"N={args.n} K={args.k} D={args.d} layers={args.layers} precision={args.precision} "
          f"learning={args.learning}")
    print(f"launches a step: {result['launches']} ({result['triton_launches']} Triton)")
    print(f"bytes a step: {result['bytes'] / 1e9:.3f} GB; by op:")
    for op, moved in list(result["bytes_by_op"].items())[:15]:
        print(f"  {moved / 1e6:10.1f} MB  {op}")


if __name__ == "__main__":
    main()
