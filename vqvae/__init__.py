"""A VQ-VAE image tokenizer whose vector quantizer runs on Triton kernels.

`vqvae.quantizer` is the quantizer as a library, for any model; the other modules are the VQ-VAE application built
on it (model, data, config, the trainer and the commands `python -m vqvae.train | encode | evaluate | export`). The
library never imports the application, and the kernels (`vq_kernels`, the folder kernels/) import neither.
"""
