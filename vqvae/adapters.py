"""Drop-in faces of `VectorQuantizerEMA` for models written against the popular quantizers.

Each adapter takes the constructor arguments and returns the outputs of the quantizer it stands in for, and runs
the same EMA codebook underneath (`self.quantizer`). What they do not reproduce is said in each docstring; in
particular none of them builds the N x K distance matrix or one-hot encodings those packages return.
"""

import torch
from torch import nn

from .quantizer import VectorQuantizerEMA


class VectorQuantize(nn.Module):
    """In the style of `vector_quantize_pytorch.VectorQuantize` (single head, Euclidean, EMA codebook).

    forward(x, mask=None) -> (quantized, indices, loss), x of shape (B, N, dim), (B, dim) or, with
    `accept_image_fmap=True`, (B, dim, H, W). The codebook starts from the first training batch (as with their
    `kmeans_init=True`, minus the k-means iterations); `load_vector_quantize_pytorch_state` takes over a
    codebook trained with that package instead. Its EMA is that package's: a constant decay, codes averaged in the
    data's own coordinates, and a dead code (EMA count under `threshold_ema_dead_code`) re-seeded from a batch row
    with that count, unless `quantizer_kwargs` ask for our options (`ema_warmup`, `affine_reparam`, ...). Their
    other options (heads, projections, cosine similarity, rotation trick, ...) are not offered: the gradient is the
    plain straight-through one.
    """

    def __init__(self, dim: int, codebook_size: int, decay: float = 0.8, eps: float = 1e-5,
                 commitment_weight: float = 1.0, threshold_ema_dead_code: float = 0.0, channel_last: bool = True,
                 accept_image_fmap: bool = False, **quantizer_kwargs):
        super().__init__()
        self.channel_last, self.accept_image_fmap = channel_last, accept_image_fmap
        layout = "channels_first" if accept_image_fmap or not channel_last else "channels_last"
        as_that_package = dict(ema_warmup=False, affine_reparam=False,
                               restart_count=threshold_ema_dead_code if threshold_ema_dead_code > 0 else None)
        self.quantizer = VectorQuantizerEMA(codebook_size, dim, decay, eps, commitment_weight,
                                            dead_code_threshold=threshold_ema_dead_code, layout=layout,
                                            **{**as_that_package, **quantizer_kwargs})

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantizer.codebook

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        out = self.quantizer(x, mask=mask)
        quantized, indices = out.quantized, out.indices
        if mask is not None:  # as that package does: zeros and index -1 at the padding
            grid_mask = mask.unsqueeze(1 if self.quantizer.layout == "channels_first" else -1)
            quantized = torch.where(grid_mask, quantized, 0.0)
            indices = torch.where(mask, indices, -1)
        return quantized, indices, out.loss

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.quantizer.lookup(indices)

    @torch.no_grad()
    def load_vector_quantize_pytorch_state(self, state_dict: dict) -> None:
        """Take the codebook and EMA state of a trained `vector_quantize_pytorch.VectorQuantize` (one head)."""
        codebook = state_dict["_codebook.embed"]
        if codebook.ndim != 3 or codebook.shape[0] != 1:
            raise ValueError(f"expected a single-codebook state ('_codebook.embed' of shape (1, K, D)), "
                             f"got {tuple(codebook.shape)}")
        # Their embed_avg is our embed_sum: the EMA of per-code sums, which the codebook is normalised from.
        self.quantizer.load_state_dict({
            "codebook": codebook[0].float(),
            "cluster_size": state_dict["_codebook.cluster_size"][0].float(),
            "embed_sum": state_dict["_codebook.embed_avg"][0].float(),
            "initialized": torch.tensor(True),
        })


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
        self.quantizer = VectorQuantizerEMA(n_e, e_dim, decay, commitment_weight=beta, layout="channels_first",
                                            **quantizer_kwargs)

    def forward(self, z: torch.Tensor):
        out = self.quantizer(z)
        indices = out.indices if self.sane_index_shape else out.indices.reshape(-1)
        return out.quantized, out.loss, (out.perplexity, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int, int] | None) -> torch.Tensor:
        """Codes for indices; with `shape` = (B, H, W, C) the result is (B, C, H, W), as taming returns it."""
        codes = self.quantizer.lookup(indices)
        if shape is not None:
            codes = codes.reshape(shape).permute(0, 3, 1, 2).contiguous()
        return codes


class SonnetVectorQuantizerEMA(nn.Module):
    """In the style of Sonnet's `VectorQuantizerEMA(embedding_dim, num_embeddings, commitment_cost, decay)`.

    forward(inputs, is_training=None) on channels-last (..., embedding_dim) -> dict with `quantize`, `loss`,
    `perplexity` and `encoding_indices`. `is_training` overrides the module's train/eval mode for the call. The
    one-hot `encodings` and the `distances` matrix are not returned.
    """

    def __init__(self, embedding_dim: int, num_embeddings: int, commitment_cost: float, decay: float,
                 epsilon: float = 1e-5, **quantizer_kwargs):
        super().__init__()
        self.quantizer = VectorQuantizerEMA(num_embeddings, embedding_dim, decay, epsilon, commitment_cost,
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
