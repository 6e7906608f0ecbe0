"""The whole GPU measurement in one command: `python -m bench.gpu_report --out DIR` (`--smoke` on a CPU).

GPU time comes in short loans, on a machine that starts bare and has no network, so the measurement is prepared
and tested beforehand and run as one command (`../shared/GPU.md`). It runs six stages, each in a process of its own
under its own time limit, each writing its part of DIR/report.json as it goes, so a stage that fails or runs long
loses nothing of the others (`stages.STAGES` holds the stages and their limits; their sum stays inside the 8
minutes a loan leaves for the run):

  environment  device, driver, versions, commit, date, where the project was imported from, the measured ceilings
  correctness  a chosen subset of the kernel tests, run by pytest on the device
  timings      every provider of every operation at the seed shape: median time, peak memory, fraction of floor
  sweep        nearest_code (`exact`, `fast`) over K = 4096 .. 262144 and D = 8, 32, 256
  step_sweep   the quantizer's training step over the same K and D, beside vector-quantize-pytorch where it fits
  training     about two minutes of `vqvae.train` on the seed configuration in bf16: images/s, the quantizer's share
               of a step, peak memory, perplexity per step

Then DIR/report.md, the tables, is written and printed. DIR holds eight files: report.json, report.md and each
stage's log. `python -m bench.summarize --gpu-report DIR/report.json` puts a GPU run into bench/RESULTS.md.

Before the loan, `bench/gpu_wheels.sh` downloads into .whl/ the wheels the report needs and the GPU image lacks;
the report installs them with `pip install --no-index --no-deps --target` into a temporary folder that its stages
find on PYTHONPATH, and leaves the machine's environment as it was. A checkout that is not installed gets its
kernels/ linked there as `vq_kernels` (the name it installs under), so no install step is needed on the machine.
"""
