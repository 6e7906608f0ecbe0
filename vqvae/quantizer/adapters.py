"""Drop-in faces of `VectorQuantizer` for models written against the popular quantizers.

Each adapter takes the constructor arguments and returns the outputs of the quantizer it stands in for, and runs
our quantizer underneath (`self.quantizer`). What they do not reproduce is said in each docstring; in
particular none of them builds the N x K distance matrix or one-hot encodings those packages return.

The vector-quantize-pytorch adapters reproduce release 1.32.0 (`VQP_RELEASE`), which the parity tests run against.
1.34 changed what they reproduce: a dead code is one under a ratio of the mean count (`dead_code_threshold_ratio`,
where 1.32.0 takes a count, `threshold_ema_dead_code`), and its EMA normalises the codes as
(embed_avg + eps embed) / (cluster_size + eps) from counts and sums that start at zero, where 1.32.0 divides by
Laplace-smoothed counts. A 1.34 keyword, or a state whose codes 1.32.0's EMA would not give, is refused by name.
"""

import torch
from torch import nn

from vqvae.quantizer.residual import ResidualVectorQuantizer
from vqvae.quantizer.vector_quantizer import VectorQuantizer

VQP_RELEASE = "1.32.0"  # the vector-quantize-pytorch release the adapters reproduce
# Keywords of later releases, which 1.32.0 does not have, and what stands for each here.
LATER_KEYWORDS = {
    "dead_code_threshold_ratio": "threshold_ema_dead_code, a count: a code is dead under that EMA count",
    "reset_cluster_size_ratio": "threshold_ema_dead_code, whose count a restarted code also starts with",
}


class VectorQuantize(nn.Module):
    """In the style of `vector_quantize_pytorch.VectorQuantize` 1.32.0 (single head, Euclidean, EMA codebook).

    forward(x, mask=None) -> (quantized, indices, loss), x of shape (B, N, dim), (B, dim) or, with
    `accept_image_fmap=True`, (B, dim, H, W). The codebook starts from the first training batch, as with their
    `kmeans_init=True` (seeds, then `kmeans_init_iters`=10 Lloyd iterations whose counts start the EMA counts);
    `load_vector_quantize_pytorch_state` takes over a codebook trained with that package instead. Its EMA is that
    package's: a constant decay, codes averaged in the data's own coordinates, and a dead code (EMA count under
    `threshold_ema_dead_code`) re-seeded from a batch row with that count, unless `quantizer_kwargs` ask for our
    options (`ema_warmup`, `affine_reparam`, ...). The gradient reaches the input by the rotation trick, as that
    package's default is (for dim > 1; `rotation_trick=False`: straight through). Their other options (heads,
    projections, cosine similarity, learnable codebooks: use our `learning` option, ...) are not offered.
    """

    def __init__(self, dim: int, codebook_size: int, decay: float = 0.8, eps: float = 1e-5,
                 commitment_weight: float = 1.0, threshold_ema_dead_code: float = 0.0, channel_last: bool = True,
                 accept_image_fmap: bool = False, rotation_trick: bool | None = None, **quantizer_kwargs):
        super().__init__()
        _refuse_later_keywords(type(self).__name__, quantizer_kwargs)
        self.channel_last, self.accept_image_fmap, self.eps = channel_last, accept_image_fmap, eps
        layout = "channels_first" if accept_image_fmap or not channel_last else "channels_last"
        rotation_trick = dim > 1 if rotation_trick is None else rotation_trick
        self.quantizer = VectorQuantizer(codebook_size, dim, decay, eps, commitment_weight,
                                         dead_code_threshold=threshold_ema_dead_code, layout=layout,
                                         rotation_trick=rotation_trick,
                                         **{**_as_that_package(threshold_ema_dead_code), **quantizer_kwargs})

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantizer.codebook.codes

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        out = self.quantizer(x, mask=mask)
        quantized, indices = out.quantized, out.indices
        if mask is not None:  # as that package does: zeros and index -1 at the padding
            grid_mask = mask.unsqueeze(1 if self.quantizer.options.layout == "channels_first" else -1)
            quantized = torch.where(grid_mask, quantized, 0.0)
            indices = torch.where(mask, indices, -1)
        return quantized, indices, out.loss

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.quantizer.decode(indices)

    @torch.no_grad()
    def load_vector_quantize_pytorch_state(self, state_dict: dict) -> None:
        """Take the codebook and EMA state of a trained `vector_quantize_pytorch.VectorQuantize` (one head, release
        1.32.0)."""
        self.quantizer.codebook.take_over_(_codebook_state(state_dict, "_codebook.", self.eps))


def _as_that_package(threshold_ema_dead_code: float) -> dict:
    """Our EMA options that reproduce vector-quantize-pytorch's: a constant decay, codes averaged in the data's own
    coordinates, and a dead code re-seeded with the threshold as its count."""
    return dict(ema_warmup=False, fit_weight_steps=1, affine_reparam=False,
                restart_count=threshold_ema_dead_code if threshold_ema_dead_code > 0 else None)


def _refuse_later_keywords(adapter: str, kwargs: dict) -> None:
    for name, instead in LATER_KEYWORDS.items():
        if name in kwargs:
            raise TypeError(f"{adapter} reproduces vector-quantize-pytorch {VQP_RELEASE}, which has no '{name}' "
                            f"(vector-quantize-pytorch 1.34's keyword); pass {instead}")


def _codebook_state(state_dict: dict, prefix: str, eps: float) -> dict:
    """Our quantizer state from the EuclideanCodebook of vector-quantize-pytorch 1.32.0 stored under `prefix`."""
    codebook = state_dict[prefix + "embed"]
    if codebook.ndim != 3 or codebook.shape[0] != 1:
        raise ValueError(f"expected a single-codebook state ('{prefix}embed' of shape (1, K, D)), "
                         f"got {tuple(codebook.shape)}")
    # Their embed_avg is our embed_sum: the EMA of per-code sums, which the codebook is normalised from.
    codebook, counts = codebook[0].float(), state_dict[prefix + "cluster_size"][0].float()
    sums = state_dict[prefix + "embed_avg"][0].float()
    _check_normalised_as_1_32(prefix, codebook, counts, sums, eps)
    return {
        "codes": codebook,
        "cluster_size": counts,
        "embed_sum": sums,
        # A codebook that kmeans_init has not seeded yet is seeded here, from the first training batch.
        "initialized": state_dict.get(prefix + "initted", torch.tensor(True)).bool().reshape(()),
    }


def _check_normalised_as_1_32(prefix: str, codebook, counts, sums, eps: float) -> None:
    """1.32.0 writes its codes as embed_avg over Laplace-smoothed counts after every EMA step, and a restarted code
    as a row with embed_avg = row x count: a state where they disagree was written by another release (1.34 keeps
    a code whose count is ~0 where it was, and starts its counts and sums at zero), and our EMA, which is 1.32.0's,
    would move its codes where that release would not."""
    total = counts.sum()
    smoothed = (counts + eps) / (total + counts.numel() * eps) * total
    expected = sums / smoothed[:, None]
    scale = codebook.abs().max().clamp(min=1e-12)
    off = ~torch.isclose(expected, codebook, rtol=1e-3, atol=1e-4 * float(scale)).all(dim=1)
    if off.any():
        shown = ", ".join(str(int(k)) for k in off.nonzero()[:5, 0])
        raise ValueError(
            f"'{prefix}embed' is not '{prefix}embed_avg' over the Laplace-smoothed '{prefix}cluster_size' for "
            f"{int(off.sum())} of {counts.numel()} codes (e.g. {shown}), as vector-quantize-pytorch {VQP_RELEASE} "
            f"keeps them: this state was saved by another release (1.34 normalises its codes as (embed_avg + eps "
            f"embed) / (cluster_size + eps) and starts counts and sums at zero). The adapters reproduce "
            f"{VQP_RELEASE}: train the codebook there, or let the adapter seed its own from the first batch")


class SimVQ(nn.Module):
    """In the style of `vector_quantize_pytorch.SimVQ` 1.32.0 (a frozen codebook times a learned linear map, no bias).

    forward(x) -> (quantized, indices, loss), x of shape (B, N, dim) or, with `channel_first=True`, (B, dim, ...);
    loss = commitment_weight * (mean((sg[x] - q)^2) + input_to_quantize_commit_loss_weight * mean((x - sg[q])^2)),
    that package's. Underneath is our `learning="simvq"` quantizer: the frozen base starts as the first training
    batch's rows and the map as the identity (theirs: a Gaussian base and nn.Linear's initialisation), and dead codes
    are re-seeded when `quantizer_kwargs` set `dead_code_threshold` (theirs never are).
    `load_vector_quantize_pytorch_state` takes over that package's base and map. A custom `codebook_transform`
    module and a frozen codebook of another width are not offered.
    """

    def __init__(self, dim: int, codebook_size: int, channel_first: bool = False, rotation_trick: bool = True,
                 input_to_quantize_commit_loss_weight: float = 0.25, commitment_weight: float = 1.0,
                 **quantizer_kwargs):
        super().__init__()
        weight = commitment_weight
        options = dict(learning="simvq", rotation_trick=rotation_trick, dead_code_threshold=0.0,
                       commitment_weight=weight * input_to_quantize_commit_loss_weight, codebook_weight=weight,
                       layout="channels_first" if channel_first else "channels_last")
        self.quantizer = VectorQuantizer(codebook_size, dim, **{**options, **quantizer_kwargs})

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantizer.codebook.refresh_()

    def forward(self, x: torch.Tensor):
        out = self.quantizer(x)
        return out.quantized, out.indices, out.loss

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        codes = self.quantizer.decode(indices)
        return codes.movedim(-1, 1) if self.quantizer.options.layout == "channels_first" else codes

    @torch.no_grad()
    def load_vector_quantize_pytorch_state(self, state_dict: dict) -> None:
        """Take the frozen codebook and the map of a `vector_quantize_pytorch.SimVQ` (its default transform)."""
        if "code_transform.weight" not in state_dict:
            raise ValueError("expected the state of a SimVQ with its default codebook_transform (a bias-free "
                             f"nn.Linear, 'code_transform.weight'); got keys {sorted(state_dict)}")
        base, weight = state_dict["frozen_codebook"].float(), state_dict["code_transform.weight"].float()
        codebook = self.quantizer.codebook
        codebook.take_over_({
            "base": base, "map_weight": weight, "codes": base @ weight.T, "initialized": torch.tensor(True),
            "cluster_size": torch.zeros_like(codebook.cluster_size), "rewritten": torch.zeros_like(codebook.rewritten),
        })


class ResidualVQ(nn.Module):
    """In the style of `vector_quantize_pytorch.ResidualVQ` 1.32.0 (Euclidean EMA codebooks, one head), on
    `ResidualVectorQuantizer` (`self.quantizer`).

    forward(x, mask=None, return_all_codes=False) -> (quantized, indices, losses) or, with `return_all_codes`,
    (quantized, indices, losses, all_codes): x of shape (B, N, dim), or (B, dim, H, W) with `accept_image_fmap=True`;
    indices (B, N, num_quantizers) or (B, H, W, num_quantizers); losses [num_quantizers], each layer's commitment
    loss; all_codes (num_quantizers, B, N, dim). With `quantize_dropout`, training uses the first q layers, q uniform
    in [quantize_dropout_cutoff_index + 1, num_quantizers], and the others give index -1 and loss 0. With `mask`, the
    padding gets zeros and index -1, as in that package. `codebook_dim` projects in and out around the whole stack,
    as that package does (channels-last input only).

    Each layer's EMA is that package's (a constant decay, no re-parameterisation, a dead code re-seeded with
    `threshold_ema_dead_code` as its count), unless `quantizer_kwargs` ask for our options; a codebook starts from
    the first training batch, and `load_vector_quantize_pytorch_state` takes over one trained with that package.
    Differences: the gradient (our sum passes the input's gradient through once, theirs once per layer, and only
    the layers before a residual carry its commitment gradient: see `vqvae.quantizer.residual`); in eval mode the
    losses are the commitment terms, not zeros; a shared codebook takes one EMA step per training step with every
    layer's statistics, where theirs blends them in one layer at a time. Not offered: heads, beam search, implicit
    neural codebooks, DiVeQ, `quantize_dropout_multiple_of`, cosine similarity, the rotation trick.
    """

    def __init__(self, *, dim: int, num_quantizers: int, codebook_size: int, codebook_dim: int | None = None,
                 shared_codebook: bool = False, quantize_dropout: bool = False, quantize_dropout_cutoff_index: int = 0,
                 accept_image_fmap: bool = False, decay: float = 0.8, eps: float = 1e-5,
                 commitment_weight: float = 1.0, threshold_ema_dead_code: float = 0.0, channel_last: bool = True,
                 **quantizer_kwargs):
        super().__init__()
        _refuse_later_keywords(type(self).__name__, quantizer_kwargs)
        self.accept_image_fmap, self.eps = accept_image_fmap, eps
        layout = "channels_first" if accept_image_fmap or not channel_last else "channels_last"
        codebook_dim = codebook_dim or dim
        self.has_projections = codebook_dim != dim
        if self.has_projections and layout != "channels_last":
            raise ValueError("codebook_dim projections are offered for channel-last input (B, N, dim) only")
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.quantizer = ResidualVectorQuantizer(
            num_quantizers, codebook_size, codebook_dim, shared_codebook=shared_codebook,
            layer_dropout=quantize_dropout, min_layers=min(quantize_dropout_cutoff_index + 1, num_quantizers),
            layout=layout, decay=decay, eps=eps, commitment_weight=commitment_weight,
            dead_code_threshold=threshold_ema_dead_code,
            **{**_as_that_package(threshold_ema_dead_code), **quantizer_kwargs})

    @property
    def num_quantizers(self) -> int:
        return self.quantizer.num_quantizers

    @property
    def codebooks(self) -> torch.Tensor:
        """(num_quantizers, K, codebook_dim): every layer's codes."""
        return torch.stack([self.quantizer.layer(i).codebook.codes for i in range(self.num_quantizers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_all_codes: bool = False):
        out = self.quantizer(self.project_in(x), mask=mask)
        quantized, indices = self.project_out(out.quantized), out.indices
        if mask is not None:  # as that package does: zeros and index -1 at the padding
            grid_mask = mask.unsqueeze(1 if self.quantizer.layout == "channels_first" else -1)
            quantized = torch.where(grid_mask, quantized, 0.0)
            indices = torch.where(mask[..., None], indices, -1)
        if not return_all_codes:
            return quantized, indices, out.losses
        return quantized, indices, out.losses, self.get_codes_from_indices(indices)

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(*grid, l) codes -> (num_quantizers, *grid, codebook_dim): each layer's code vector, zeros where the
        index is -1 or the layer is beyond l."""
        layers = []
        for i in range(self.num_quantizers):
            codes = indices[..., i] if i < indices.shape[-1] else torch.full_like(indices[..., 0], -1)
            layers.append(self.quantizer.decode_layer(i, codes))
        return torch.stack(layers)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(*grid, l) codes -> (*grid, dim): the sum of the first l layers' codes, projected out."""
        return self.project_out(self.quantizer.decode(indices))

    @torch.no_grad()
    def load_vector_quantize_pytorch_state(self, state_dict: dict) -> None:
        """Take the codebooks and EMA state (and projections) of a trained `vector_quantize_pytorch.ResidualVQ`
        (release 1.32.0)."""
        for i, layer in enumerate(self.quantizer.layers):
            layer.codebook.take_over_(_codebook_state(state_dict, f"layers.{i}._codebook.", self.eps))
        if self.has_projections:
            for name in ("project_in", "project_out"):
                getattr(self, name).load_state_dict({key: state_dict[f"{name}.{key}"] for key in ("weight", "bias")})


class TamingVectorQuantizer(nn.Module):
    """In the style of taming-transformers' `VectorQuantizer2(n_e, e_dim, beta)`, with an EMA codebook.

    forward(z) on (B, C, H, W) -> (z_q, loss, (perplexity, None, indices)); indices are flat (B*H*W,) unless
    `sane_index_shape=True`. The loss is beta times the commitment term only: an EMA codebook needs no codebook
    loss. The one-hot `min_encodings` is not built (None in its place).
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, decay: float = 0.99, sane_index_shape: bool = False,
                 **quantizer_kwargs):
        super().__init__()
        self.sane_index_shape = sane_index_shape
        self.quantizer = VectorQuantizer(n_e, e_dim, decay, commitment_weight=beta, layout="channels_first",
                                            **quantizer_kwargs)

    def forward(self, z: torch.Tensor):
        out = self.quantizer(z)
        indices = out.indices if self.sane_index_shape else out.indices.reshape(-1)
        return out.quantized, out.loss, (out.perplexity, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int, int] | None) -> torch.Tensor:
        """Codes for indices; with `shape` = (B, H, W, C) the result is (B, C, H, W), as taming returns it."""
        codes = self.quantizer.decode(indices)
        if shape is not None:
            codes = codes.reshape(shape).permute(0, 3, 1, 2).contiguous()
        return codes


class SonnetVectorQuantizerEMA(nn.Module):
    """In the style of Sonnet's `VectorQuantizer(embedding_dim, num_embeddings, commitment_cost, decay)`.

    forward(inputs, is_training=None) on channels-last (..., embedding_dim) -> dict with `quantize`, `loss`,
    `perplexity` and `encoding_indices`. `is_training` overrides the module's train/eval mode for the call. The
    one-hot `encodings` and the `distances` matrix are not returned.
    """

    def __init__(self, embedding_dim: int, num_embeddings: int, commitment_cost: float, decay: float,
                 epsilon: float = 1e-5, **quantizer_kwargs):
        super().__init__()
        self.quantizer = VectorQuantizer(num_embeddings, embedding_dim, decay, epsilon, commitment_cost,
                                            layout="channels_last", **quantizer_kwargs)

    def forward(self, inputs: torch.Tensor, is_training: bool | None = None) -> dict:
        mode = self.quantizer.training
        if is_training is not None:
            self.quantizer.train(is_training)
        try:
            out = self.quantizer(inputs)
        finally:
            self.quantizer.train(mode)
        return {"quantize": out.quantized, "loss": out.loss, "perplexity": out.perplexity,
                "encoding_indices": out.indices}
