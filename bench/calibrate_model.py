"""The static model (`bench.compile_for_gpu --model`) recalibrated on the one GPU run we have, with its error
measured out of sample.

    python -m bench.calibrate_model

The static model prices a search from its compiled loop and was 2-3x optimistic at every shape of the H200 run
(bench/NOTES.md, "Predicted against measured"). Three corrections are fitted to those ten shapes, each mode (`fast`,
`exact`) on its own, and each is scored leave-one-out: fitted on nine shapes, tested on the tenth, ten times.
  scale         measured = a x predicted
  split         measured = a x floor + b x (predicted - floor): the tensor-core floor (2 N K D / 989 TFLOP/s) and the
                rest of the prediction (issue, the minimum's bookkeeping) each under its own factor, since the model
                misses more where the rest dominates (small D)
  floor+scores  measured = a x floor + b x N K (per score): no static figures at all, the baseline the static model
                must beat to be worth its compile
The fit minimises relative error (each shape weighs the same). `calibrated` gives the chosen correction and its
leave-one-out error, which `compile_for_gpu --model` prints beside each raw prediction.
"""

from __future__ import annotations

import numpy as np

# N = 65,536 rows. (K, D, tensor-core floor us, fast predicted, fast measured, exact predicted, exact measured):
# the predictions of commits 58ceceb (seed shape) and 43e4785 (the rest) against the H200 run at eadda16.
H200_RUN = [
    (4096, 256, 139, 159, 404, 190, 599),
    (16384, 8, 17, 175, 508, 441, 897),
    (16384, 32, 69, 178, 518, 443, 953),
    (16384, 256, 556, 652, 1320, 832, 1790),
    (65536, 8, 69, 689, 1940, 1739, 3250),
    (65536, 32, 278, 704, 1980, 1751, 3550),
    (65536, 256, 2223, 2600, 5280, 3303, 6750),
    (262144, 8, 278, 2743, 7650, 6929, 12700),
    (262144, 32, 1112, 2805, 7790, 6982, 14100),
    (262144, 256, 8894, 10389, 20500, 13187, 26400),
]
N = 65536
TRITON_RELEASE = "3.6"  # the predictions above were compiled by it, as the GPU machines run it: compile under it too
MODES = {"fast": (3, 4), "exact": (5, 6)}  # columns of (predicted, measured)


def features(correction: str, k, floor, predicted) -> np.ndarray:
    if correction == "scale":
        return np.stack([predicted], axis=1)
    if correction == "split":
        return np.stack([floor, predicted - floor], axis=1)
    if correction == "floor+scores":
        return np.stack([floor, N * k / 1e6], axis=1)  # per million scores
    raise ValueError(f"unknown correction {correction!r}")


def fit(design: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Least squares in relative error, coefficients kept >= 0 (a cost cannot be negative)."""
    weighted = design / measured[:, None]
    coefficients, *_ = np.linalg.lstsq(weighted, np.ones_like(measured), rcond=None)
    if (coefficients < 0).any():  # a factor driven below zero: drop it, refit the rest
        keep = coefficients >= 0
        coefficients = np.zeros_like(coefficients)
        coefficients[keep], *_ = np.linalg.lstsq(weighted[:, keep], np.ones_like(measured), rcond=None)
    return coefficients


def columns(mode: str):
    table = np.array(H200_RUN, dtype=float)
    predicted, measured = (table[:, c] for c in MODES[mode])
    return table[:, 0], table[:, 1], table[:, 2], predicted, measured


def leave_one_out(mode: str, correction: str) -> np.ndarray:
    """Relative error (predicted / measured - 1) on each shape by a correction fitted without it."""
    k, _, floor, predicted, measured = columns(mode)
    design = features(correction, k, floor, predicted)
    errors = []
    for i in range(len(measured)):
        rest = np.arange(len(measured)) != i
        coefficients = fit(design[rest], measured[rest])
        errors.append(design[i] @ coefficients / measured[i] - 1)
    return np.array(errors)


def calibrated(mode: str, correction: str = "split") -> tuple[np.ndarray, float]:
    """The correction's coefficients fitted on every shape, and its worst leave-one-out relative error."""
    k, _, floor, predicted, measured = columns(mode)
    coefficients = fit(features(correction, k, floor, predicted), measured)
    return coefficients, float(np.abs(leave_one_out(mode, correction)).max())


def correct(prediction_us: float, floor_us: float, mode: str) -> tuple[float, float]:
    """A raw static prediction turned into (calibrated us, its +- relative error out of sample)."""
    (a, b), error = calibrated(mode)
    return a * floor_us + b * (prediction_us - floor_us), error


def main() -> None:
    for mode in MODES:
        k, d, floor, predicted, measured = columns(mode)
        print(f"{mode}: raw static model, measured / predicted {(measured / predicted).min():.2f}-"
              f"{(measured / predicted).max():.2f}")
        for correction in ("scale", "split", "floor+scores"):
            errors = leave_one_out(mode, correction)
            coefficients = fit(features(correction, k, floor, predicted), measured)
            print(f"  {correction:13s} coefficients {np.round(coefficients, 3).tolist()}; leave-one-out error: "
                  f"RMS {np.sqrt((errors ** 2).mean()):.1%}, worst {np.abs(errors).max():.1%} "
                  f"(at K={k[np.abs(errors).argmax()]:.0f}, D={d[np.abs(errors).argmax()]:.0f})")


if __name__ == "__main__":
    main()
