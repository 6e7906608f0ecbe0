"""How the codes learn (`QuantizerOptions.learning`): one of three rules, each a small part of the codebook.

- "ema" (`EMALearning`): the codes are buffers, each the moving average of the rows that chose it (Sonnet's
  VectorQuantizerEMA). The quantizer's loss pulls the encoder alone.
- "gradient" (`GradientLearning`): the codes are a parameter [K, D] that the optimizer trains through the codebook
  loss codebook_weight * mean((sg[x] - q)^2), the VQ-VAE paper's second term. With `cosine` the parameter's rows are
  l2-normalised where they are used, so the gradient has no radial part (LlamaGen's recipe: 8-dimensional
  normalised codes).
- "simvq" (`SimVQLearning`): the codes are a frozen base [K, D] times a learned map, q_k = W b_k (SimVQ, Zhu et al.
  2024, arXiv 2411.02038). Every step of W moves every code, used or not, so a code does not starve for want of
  rows of its own. W starts as the identity and the base as the codes the first batch seeds.

Whatever the rule, the codebook's `codebook` buffer holds the codes as the search reads them, and the codebook's
other parts (the seeding, the Lloyd fit, the restarts) read and write the codes there. A learned codebook rebuilds
that buffer from its parameters before each search (`refresh_`, which returns the codes with their autograd
graph), and the codes those parts wrote go back into the parameters (`codes_written_`). For EMA codes that is at
once; for learned codes at the start of the next forward, because the autograd graph of the forward that wrote
them (a restart happens inside it) still holds the parameters' values. A restarted `gradient` code replaces its
row of the parameter; a restarted `simvq` code replaces its base row by one that the map sends onto the chosen
row (through the map's pseudo-inverse), so what a restart means is the same for all three.

Every rule keeps `cluster_size`, the EMA of each code's rows per step: the usage that restarts read; only EMA codes
also average the rows themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EMALearning:
    name = "ema"
    learned = False  # no parameters: the quantizer's loss has no codebook term

    def register(self, book) -> None:
        book.register_buffer("embed_sum", torch.zeros(book.num_codes, book.dim))

    def refresh_(self, book) -> torch.Tensor:
        return book.codebook

    def step_(self, book, counts, sums, decay) -> None:
        """Sonnet's blend of the batch's counts and sums (`kernels.reference.ema_blend_`), then cosine codes back
        onto the sphere (a batch without rows changes nothing)."""
        book.backend.blend_(book.cluster_size, book.embed_sum, book.codebook, counts, sums, decay, book.eps)
        if book.cosine:
            book.codebook.copy_(torch.where(counts.sum() > 0, F.normalize(book.codebook, dim=1), book.codebook))

    def codes_written_(self, book, where: torch.Tensor | None) -> None:
        """A written code's EMA sum is its count times the code (the average it would have had)."""
        written = book.codebook * book.cluster_size[:, None]
        book.embed_sum.copy_(written if where is None else torch.where(where[:, None], written, book.embed_sum))


class GradientLearning:
    name = "gradient"
    learned = True

    def register(self, book) -> None:
        self._register_parameters(book)
        # Codes that the codebook's parts wrote since the last forward, to carry into the parameters (saved, so a
        # checkpoint taken between a restart and the next forward keeps it).
        book.register_buffer("rewritten", torch.zeros(book.num_codes, dtype=torch.bool))

    def _register_parameters(self, book) -> None:
        book.weight = nn.Parameter(book.codebook.clone())

    def codes(self, book) -> torch.Tensor:
        return F.normalize(book.weight, dim=1) if book.cosine else book.weight

    def refresh_(self, book) -> torch.Tensor:
        if book._carry_back:  # a host flag: only after a step or a load (never between a shared codebook's layers)
            with torch.no_grad():
                self._carry_back_(book, book.rewritten)
                book.rewritten.zero_()
            book._carry_back = False
        codes = self.codes(book)
        with torch.no_grad():
            book.codebook.copy_(codes)
        return codes

    def _carry_back_(self, book, where: torch.Tensor) -> None:
        # Cosine codes are unit rows, which normalise to themselves.
        book.weight.copy_(torch.where(where[:, None], book.codebook, book.weight))

    def step_(self, book, counts, sums, decay) -> None:
        """The usage counts' EMA alone (the optimizer moves the codes)."""
        blended = decay * book.cluster_size + (1.0 - decay) * counts
        book.cluster_size.copy_(torch.where(counts.sum() > 0, blended, book.cluster_size))

    def codes_written_(self, book, where: torch.Tensor | None) -> None:
        if where is None:
            book.rewritten.fill_(True)
        else:
            book.rewritten.copy_(book.rewritten | where)
        book._carry_back = True


class SimVQLearning(GradientLearning):
    name = "simvq"

    def _register_parameters(self, book) -> None:
        book.register_buffer("base", book.codebook.clone())  # frozen: no gradient; restarts rewrite rows
        book.map_weight = nn.Parameter(torch.eye(book.dim))  # q_k = W b_k, as nn.Linear(dim, dim, bias=False)

    def codes(self, book) -> torch.Tensor:
        codes = book.base @ book.map_weight.T
        return F.normalize(codes, dim=1) if book.cosine else codes

    def _carry_back_(self, book, where: torch.Tensor) -> None:
        # b = q W^+^T: the base row that the map sends onto the code (exactly, while W has full rank; for cosine
        # codes, onto its direction). The pseudo-inverse is taken in fp64: W may be ill-conditioned.
        inverse = torch.linalg.pinv(book.map_weight.double()).T
        book.base.copy_(torch.where(where[:, None], (book.codebook.double() @ inverse).float(), book.base))


LEARNINGS = {rule.name: rule for rule in (EMALearning, GradientLearning, SimVQLearning)}


def learning_from_options(options):
    return LEARNINGS[options.learning]()
