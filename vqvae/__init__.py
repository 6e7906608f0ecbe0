"""VQ-VAE image tokenizer with a vector quantizer on Triton kernels (codes learned by EMA, by gradient or as SimVQ)."""

from .quantizer import QuantizerOutput, VectorQuantizer, VectorQuantizerEMA
from .residual import ResidualVectorQuantizer, ResidualVectorQuantizerEMA

__all__ = ["QuantizerOutput", "ResidualVectorQuantizer", "ResidualVectorQuantizerEMA", "VectorQuantizer",
           "VectorQuantizerEMA"]
