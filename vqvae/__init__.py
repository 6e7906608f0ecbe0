"""VQ-VAE image tokenizer with an EMA vector quantizer on Triton kernels."""

from .quantizer import QuantizerOutput, VectorQuantizerEMA

__all__ = ["QuantizerOutput", "VectorQuantizerEMA"]
