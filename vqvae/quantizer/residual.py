"""`ResidualVectorQuantizer`: a stack of vector quantizers, each quantizing what the layers before it left.

Layer 1 quantizes the input x; layer l + 1 quantizes the residual r_{l+1} = r_l - q_l that layers 1..l leave, and the
output is the sum of the layers' codes q_1 + ... + q_L (residual VQ: SoundStream, EnCodec, DAC, RQ-VAE). Each layer
is a `VectorQuantizer` built from the same keyword arguments, so every option of the single layer (backend,
precision, how the codes learn, EMA warm-up, affine re-parameterisation, dead-code restarts, k-means++ seeding,
low-dimensional or cosine codes, the rotation trick, determinism) holds for every layer, as do masks,
`accumulate()` and the all-reduce under torch.distributed: the layers do all of it themselves, and nothing of their
logic is repeated here.

Gradients. q_l is layer l's straight-through output, and the residuals are formed from it, as in EnCodec and DAC:
- the summed output hands the gradient to the input unchanged (exactly: layers 2..L see, to autograd, the input minus
  a straight-through copy of itself, so their share is G - G = 0). Layers with projections (`codebook_dim`) or
  cosine codes have a Jacobian J_l other than the identity; the output's is then I - (I - J_L)...(I - J_1), and
  their projections learn from the output's gradient as a single layer's do.
- layer l's commitment loss, commitment_weight * mean((r_l - sg[q_l])^2), reaches the encoder through the layers
  before it: with plain layers only layer 1's does, as in EnCodec. Where a layer's straight-through gradient is the
  identity, the residual it leaves is detached from the graph: exact (its gradient would be G - G = 0), and the
  deeper layers then keep no tensors for the backward pass, so a stack of 8 needs about the memory of one.
  (vector-quantize-pytorch differs here: its residuals are detached from the codes, so each layer's commitment
  pulls the input, and its summed output passes L times the gradient to the input.)
- The residuals are computed in fp32 whatever the input's dtype (a bf16 residual after a few layers would be mostly
  rounding); the output takes the input's dtype.

Shared codebook (`shared_codebook=True`): one `VectorQuantizer` serves every layer. Within a forward pass every
layer searches the same codebook, and the codebook takes one EMA step per training step with all layers'
statistics summed (the layers run inside the codebook's `accumulate()`): the decay keeps its per-step meaning, and a
code is averaged over every vector, at any depth, that chose it. The dead-code re-seed candidates of that step are
drawn from the last layer's residuals. (vector-quantize-pytorch's shared codebook instead blends each layer's
statistics into the EMA in turn, L decays per step.)

Quantizer dropout (`layer_dropout=True`, training only, as in SoundStream): each training forward uses only the first
q layers, q drawn uniformly from [min_layers, num_quantizers], so the first layers learn to stand alone and the codes
can be decoded at any depth. The draw comes from a counter kept in the state (not from torch's RNG), so that every
process under torch.distributed runs the same layers (each layer all-reduces its statistics) and a resumed run draws
what the uninterrupted one would have. Dropped layers report index -1, loss 0, perplexity 1 and usage 0, and their
codebooks do not move.

Saving: `save_pretrained(folder)` / `ResidualVectorQuantizer.from_pretrained(folder or repo id)` write and read
the constructor's arguments and every layer's state as config.json and model.safetensors (`vqvae.quantizer.hub`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass

import torch
from torch import nn

from vqvae.quantizer.codebook import Codebook
from vqvae.quantizer.hub import HubMixin
from vqvae.quantizer.layout import from_rows, grid_shape, mask_rows, to_rows
from vqvae.quantizer.options import QuantizerOptions, ResidualOptions
from vqvae.quantizer.vector_quantizer import ResidualQuantizerOutput, VectorQuantizer


@dataclass
class ResidualStep:
    """What `accumulate()` yields; `dead_codes` ([num_quantizers], int64) is set when its block ends."""

    dead_codes: torch.Tensor | None = None


class ResidualVectorQuantizer(nn.Module, HubMixin):
    """Quantize (B, dim, *spatial) or (..., dim) tensors with `num_quantizers` residual layers of `num_codes` codes.

    The stack's own keywords are the fields of `vqvae.quantizer.options.ResidualOptions` (`shared_codebook`: one
    codebook for every layer, see the module docstring; `layer_dropout`: in training, use only the first q layers,
    q uniform in [min_layers, num_quantizers]); every other one is a field of `QuantizerOptions`, for each layer
    (`layout`: how the input is read, as for `VectorQuantizer`).
    """

    def __init__(self, num_quantizers: int, num_codes: int = 4096, dim: int = 256, **kwargs):
        super().__init__()
        stack = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(ResidualOptions) if f.name in kwargs}
        self.residual = ResidualOptions(num_quantizers, **stack)
        self.num_quantizers, self.num_codes, self.dim = num_quantizers, num_codes, dim
        self.shared_codebook = self.residual.shared_codebook
        self.layout = QuantizerOptions(num_codes, **kwargs).layout  # checks every layer option once, here
        # The layers are handed rows (N, dim), never the caller's tensor: the layout is read once, here.
        layer_kwargs = {**kwargs, "layout": "channels_last"}
        count = 1 if self.shared_codebook else num_quantizers
        self.layers = nn.ModuleList(VectorQuantizer(num_codes, dim, **layer_kwargs) for _ in range(count))
        # Training forwards that drew a number of layers: the quantizer-dropout clock (see the module docstring),
        # with a host copy so that drawing never reads the device.
        self.register_buffer("dropout_draws", torch.tensor(0, dtype=torch.int64))
        self._draws = 0
        self._accumulating = False
        self.register_load_state_dict_post_hook(lambda module, _: module._sync_draws())
        # config.json of save_pretrained: every option written out.
        self._hub_mixin_config = {"num_codes": num_codes, "dim": dim, **dataclasses.asdict(self.residual),
                                  **{**self.layers[0].options.as_dict(), "layout": self.layout}}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.residual).items()) + \
            f", layout={self.layout!r}"

    def codebooks(self) -> list[Codebook]:
        """Every codebook: each layer's, or the shared one."""
        return [layer.codebook for layer in self.layers]

    def layer(self, index: int) -> VectorQuantizer:
        """The quantizer of layer `index` (from 0): its own, or the shared one."""
        return self.layers[0 if self.shared_codebook else index]

    # -- forward --------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                num_layers: int | None = None) -> ResidualQuantizerOutput:
        """Quantize x, (B, dim, *spatial) or (..., dim). `mask` (bool, the shape of the code grid) marks the
        positions to learn from, as for `VectorQuantizer`. `num_layers` uses only the first that many layers
        (overriding quantizer dropout); the others report index -1."""
        rows, channels_first = to_rows(x, self.dim, self.layout, self.layer(0).codebook.codes.device)
        grid = grid_shape(x.shape, channels_first)
        keep = None if mask is None else mask_rows(mask, grid, rows.device)
        used = self._layers_to_use(num_layers)
        with self._shared_ema_step() as step:
            quantized, outs = self._run_layers(rows.float(), keep, used)
        per_layer = self._per_layer_figures(outs, rows.shape[0], step)
        return ResidualQuantizerOutput(
            quantized=from_rows(quantized.to(x.dtype), x.shape, channels_first),
            indices=per_layer["indices"].reshape(*grid, self.num_quantizers),
            loss=per_layer["losses"].sum(),
            **{name: per_layer[name] for name in ("losses", "perplexity", "usage", "dead_codes")},
        )

    def _run_layers(self, residual: torch.Tensor, keep: torch.Tensor | None, used: int):
        """The sum of the first `used` layers' outputs, and each layer's QuantizerOutput less its output (kept in
        the sum alone: a list of L outputs would hold L copies of the input's size)."""
        total, outs = None, []
        for index in range(used):
            layer = self.layer(index)
            out = layer(residual, keep)
            total = out.quantized if total is None else total + out.quantized
            residual = residual - out.quantized
            plain = layer.options
            if plain.codebook_dim is None and not plain.cosine and not plain.rotation_trick:
                # A plain layer's straight-through gradient is the identity, so the gradient through this residual
                # would cancel exactly (r - q with dq/dr = I): cutting it changes nothing and keeps the deeper
                # layers' tensors out of the autograd graph. (Learned codes get theirs from the loss alone.)
                residual = residual.detach()
            outs.append(out._replace(quantized=None))
        return total, outs

    def _layers_to_use(self, num_layers: int | None) -> int:
        if num_layers is not None:
            if not isinstance(num_layers, int) or not 1 <= num_layers <= self.num_quantizers:
                raise ValueError(f"num_layers must be an int in [1, {self.num_quantizers}], got {num_layers!r}")
            return num_layers
        if not (self.training and self.residual.layer_dropout):
            return self.num_quantizers
        # Seeded by the clock alone: every process draws the same number, and a resumed run the same sequence.
        used = random.Random(self._draws).randint(self.residual.min_layers, self.num_quantizers)
        self._draws += 1
        self.dropout_draws.fill_(self._draws)
        return used

    @contextlib.contextmanager
    def _shared_ema_step(self):
        """A shared codebook in training takes one EMA step for all the layers of this forward, unless an
        accumulate() block of this module already gathers the statistics."""
        if not (self.shared_codebook and self.training) or self._accumulating:
            yield None
            return
        with self.layers[0].accumulate() as step:
            yield step

    def _per_layer_figures(self, outs: list, num_rows: int, step) -> dict:
        device = self.layer(0).codebook.codes.device
        unused = self.num_quantizers - len(outs)
        no_codes = torch.full((num_rows,), -1, dtype=torch.int64, device=device)
        indices = [out.indices for out in outs] + [no_codes] * unused
        zero, one = torch.zeros((), device=device), torch.ones((), device=device)
        dead = [out.dead_codes for out in outs] + [self.layer(i).dead_codes().sum() for i in range(len(outs),
                                                                                                 self.num_quantizers)]
        figures = {
            "indices": torch.stack(indices, dim=-1),
            "losses": torch.stack([out.loss for out in outs] + [zero] * unused),
            "perplexity": torch.stack([out.perplexity for out in outs] + [one] * unused),
            "usage": torch.stack([out.usage for out in outs] + [zero] * unused),
            "dead_codes": torch.stack(dead),
        }
        if step is not None and step.dead_codes is not None:  # the shared codebook's step, taken after the layers
            figures["dead_codes"] = step.dead_codes.expand(self.num_quantizers).clone()
        return figures

    # -- codes ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """The codes of x with the first `num_layers` layers (all by default): int64 (*code grid, num_layers).
        Never moves a codebook."""
        was_training = self.training
        self.eval()
        try:
            used = self.num_quantizers if num_layers is None else num_layers
            return self.forward(x, num_layers=used).indices[..., :used]
        finally:
            self.train(was_training)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """The output for codes (*grid, l), from the first l <= num_quantizers layers: float32 (*grid, dim),
        channels-last. Index -1 (a dropped layer) adds nothing."""
        if not isinstance(indices, torch.Tensor) or indices.ndim < 1:
            raise ValueError("indices must be a tensor (*grid, layers) with the layers on its last axis")
        if not 1 <= indices.shape[-1] <= self.num_quantizers:
            raise ValueError(f"indices has {indices.shape[-1]} layers on its last axis (shape "
                             f"{tuple(indices.shape)}); this quantizer has 1 to {self.num_quantizers}")
        total = self.decode_layer(0, indices[..., 0])
        for index in range(1, indices.shape[-1]):
            total = total + self.decode_layer(index, indices[..., index])
        return total

    def decode_layer(self, index: int, codes: torch.Tensor) -> torch.Tensor:
        """Layer `index`'s vectors for a grid of its codes: float32 (*grid, dim); zeros where the code is -1."""
        vectors = self.layer(index).decode(codes.clamp(min=0))
        return torch.where((codes >= 0)[..., None], vectors, 0.0)

    # -- training helpers -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def accumulate(self):
        """Gradient accumulation, as for `VectorQuantizer.accumulate`: every layer gathers the statistics of
        the block's micro-batches and takes one EMA step when it ends (a shared codebook: one step for all).

            with quantizer.accumulate() as step:
                ...
            step.dead_codes   # [num_quantizers] codes found dead by that step, per layer
        """
        if self._accumulating:
            raise RuntimeError("quantizer.accumulate() blocks cannot be nested")
        result = ResidualStep()
        with contextlib.ExitStack() as blocks:
            pending = [blocks.enter_context(layer.accumulate()) for layer in self.layers]
            self._accumulating = True
            try:
                yield result
            finally:
                self._accumulating = False
        # On leaving the ExitStack every layer has taken its step; a layer no micro-batch reached took none.
        dead = [p.dead_codes if p.dead_codes is not None else layer.dead_codes().sum()
                for p, layer in zip(pending, self.layers)]
        result.dead_codes = torch.stack(dead).expand(self.num_quantizers).clone() if self.shared_codebook \
            else torch.stack(dead)

    def _sync_draws(self) -> None:
        self._draws = int(self.dropout_draws)

