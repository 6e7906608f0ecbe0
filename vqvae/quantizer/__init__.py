"""The vector quantizer as a library: a drop-in `nn.Module` on the Triton kernels of `vq_kernels`, for any model.

    from vqvae.quantizer import VectorQuantizer, ResidualVectorQuantizer

    quantizer = VectorQuantizer(num_codes=4096, dim=256)      # every keyword: `QuantizerOptions`
    out = quantizer(z)                                        # z (B, 256, H, W) or (..., 256)
    out.quantized, out.indices, out.loss, out.perplexity, out.usage, out.dead_codes

The modules, from the outside in (none of them imports the VQ-VAE application around it, `vqvae.*`):
  vector_quantizer   `VectorQuantizer`: layout, projection, loss, straight-through or rotation-trick gradient
  residual           `ResidualVectorQuantizer`: a stack of them, each quantizing what the ones before left
  adapters           faces of other packages' quantizers (vector-quantize-pytorch, taming, Sonnet)
  options            every option, once (`QuantizerOptions`, `ResidualOptions`)
  codebook           `Codebook`: its state, its search, and the order in which its parts run
  learning           how the codes learn: the learning modes "ema", "gradient", "simvq"
  health             the health rules that keep the codebook in use (warm-up, k-means, restarts, ...)
  backend            the Triton kernels or their PyTorch references, behind one interface
  seeding, layout, sync, metrics, hub    new codes' rows; input layouts; ranks; counts and perplexity; saving
"""

from vqvae.quantizer.options import OptionError, QuantizerOptions, ResidualOptions
from vqvae.quantizer.residual import ResidualVectorQuantizer
from vqvae.quantizer.vector_quantizer import (
           QuantizerOutput,
           ResidualQuantizerOutput,
           VectorQuantizer,
)

__all__ = ["OptionError", "QuantizerOptions", "QuantizerOutput", "ResidualOptions", "ResidualQuantizerOutput",
           "ResidualVectorQuantizer", "VectorQuantizer"]
