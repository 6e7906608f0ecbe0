"""How the codes learn (`QuantizerOptions.learning`): one of three learning modes, each a small part of the
codebook.

- "ema" (`EMALearning`): the codes are buffers, each the moving average of the rows that chose it (as in
  Sonnet's VectorQuantizerEMA). The quantizer's loss pulls the encoder alone.
- "gradient" (`GradientLearning`): the codes are a parameter [K, D] that the optimizer trains through the codebook
  loss codebook_weight * mean((sg[x] - q)^2), the VQ-VAE paper's second term. With `cosine` the parameter's rows are
  l2-normalised where they are used, so the gradient has no radial part (LlamaGen's recipe: 8-dimensional
  normalised codes).
- "simvq" (`SimVQLearning`): the codes are a frozen base [K, D] times a learned map, q_k = W b_k (SimVQ, Zhu et al.
  2024, arXiv 2411.02038). Every step of W moves every code, used or not, so a code does not starve for want of
  rows of its own. W starts as the identity and the base as the codes the first batch seeds.

Whatever the mode, the codebook's `codes` buffer holds the codes as the search reads them, and the codebook's
other parts (the seeding, the k-means fit, the restarts) read and write the codes there. A learned codebook rebuilds
that buffer from its parameters before each search (`refresh_`, which returns the codes with their autograd
graph), and the codes those parts wrote go back into the parameters (`codes_written_`). For EMA codes that is at
once; for learned codes at the start of the next forward, because the autograd graph of the forward that wrote
them (a restart happens inside it) still holds the parameters' values. A restarted `gradient` code replaces its
row of the parameter; a restarted `simvq` code replaces its base row by one that the map sends onto the chosen
row (through the map's pseudo-inverse), so what a restart means is the same for all three.

Every mode keeps `cluster_size`, the EMA of each code's rows per step: the usage that restarts read; only EMA codes
also average the rows themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqvae.quantizer.metrics import blend_counts_


class EMALearning:
    name = "ema"
    learned = False  # no parameters: the quantizer's loss has no codebook term

    def register(self, codebook) -> None:
        codebook.register_buffer("embed_sum", torch.zeros(codebook.num_codes, codebook.dim))

    def refresh_(self, codebook) -> torch.Tensor:
        return codebook.codes

    def step_(self, codebook, counts, sums, decay) -> None:
        """Sonnet's blend of the batch's counts and sums (`vq_kernels.reference.ema_blend_`), then cosine codes back
        onto the sphere (a batch without rows changes nothing)."""
        codebook.backend.blend_(codebook.cluster_size, codebook.embed_sum, codebook.codes, counts, sums, decay,
                                codebook.eps)
        if codebook.cosine:
            codebook.codes.copy_(torch.where(counts.sum() > 0, F.normalize(codebook.codes, dim=1), codebook.codes))

    def codes_written_(self, codebook, where: torch.Tensor | None) -> None:
        """A written code's EMA sum is its count times the code (the average it would have had)."""
        written = codebook.codes * codebook.cluster_size[:, None]
        codebook.embed_sum.copy_(written if where is None else torch.where(where[:, None], written, codebook.embed_sum))


class GradientLearning:
    name = "gradient"
    learned = True

    def register(self, codebook) -> None:
        self._register_parameters(codebook)
        # Codes that the codebook's parts wrote since the last forward, to carry into the parameters (saved, so a
        # checkpoint taken between a restart and the next forward keeps it).
        codebook.register_buffer("rewritten", torch.zeros(codebook.num_codes, dtype=torch.bool))

    def _register_parameters(self, codebook) -> None:
        codebook.weight = nn.Parameter(codebook.codes.clone())

    def codes(self, codebook) -> torch.Tensor:
        return F.normalize(codebook.weight, dim=1) if codebook.cosine else codebook.weight

    def refresh_(self, codebook) -> torch.Tensor:
        if codebook._carry_back:  # a host flag: only after a step or a load (never between a shared codebook's layers)
            with torch.no_grad():
                self._carry_back_(codebook, codebook.rewritten)
                codebook.rewritten.zero_()
            codebook._carry_back = False
        codes = self.codes(codebook)
        with torch.no_grad():
            codebook.codes.copy_(codes)
        return codes

    def _carry_back_(self, codebook, where: torch.Tensor) -> None:
        # Cosine codes are unit rows, which normalise to themselves.
        codebook.weight.copy_(torch.where(where[:, None], codebook.codes, codebook.weight))

    def step_(self, codebook, counts, sums, decay) -> None:
        """The usage counts' EMA alone (the optimizer moves the codes)."""
        blend_counts_(codebook.cluster_size, counts, decay)

    def codes_written_(self, codebook, where: torch.Tensor | None) -> None:
        if where is None:
            codebook.rewritten.fill_(True)
        else:
            codebook.rewritten.copy_(codebook.rewritten | where)
        codebook._carry_back = True


class SimVQLearning(GradientLearning):
    name = "simvq"

    def _register_parameters(self, codebook) -> None:
        codebook.register_buffer("base", codebook.codes.clone())  # frozen: no gradient; restarts rewrite rows
        codebook.map_weight = nn.Parameter(torch.eye(codebook.dim))  # q_k = W b_k, as nn.Linear(dim, dim, bias=False)

    def codes(self, codebook) -> torch.Tensor:
        codes = codebook.base @ codebook.map_weight.T
        return F.normalize(codes, dim=1) if codebook.cosine else codes

    def _carry_back_(self, codebook, where: torch.Tensor) -> None:
        # b = q W^+^T: the base row that the map sends onto the code (exactly, while W has full rank; for cosine
        # codes, onto its direction). The pseudo-inverse is taken in fp64: W may be ill-conditioned.
        inverse = torch.linalg.pinv(codebook.map_weight.double()).T
        codebook.base.copy_(torch.where(where[:, None], (codebook.codes.double() @ inverse).float(), codebook.base))


LEARNING_MODES = {mode.name: mode for mode in (EMALearning, GradientLearning, SimVQLearning)}


def learning_from_options(options):
    return LEARNING_MODES[options.learning]()
