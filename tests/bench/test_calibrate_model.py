"""`bench.calibrate_model`: the static model's correction, fitted on the H200 run and scored leave-one-out."""

import numpy as np
import pytest

from bench import calibrate_model


def test_a_known_correction_is_recovered_and_scores_zero_out_of_sample(monkeypatch):
    # a run made by measured = 2 x floor + 3 x (predicted - floor) exactly
    made = [(k, d, floor, fast, 2 * floor + 3 * (fast - floor), exact, 2 * floor + 3 * (exact - floor))
            for k, d, floor, fast, _, exact, _ in calibrate_model.H200_RUN]
    monkeypatch.setattr(calibrate_model, "H200_RUN", made)
    for mode in ("fast", "exact"):
        coefficients, error = calibrate_model.calibrated(mode)
        np.testing.assert_allclose(coefficients, [2, 3], rtol=1e-9)
        assert error < 1e-9
    assert calibrate_model.correct(100.0, 40.0, "fast")[0] == pytest.approx(2 * 40 + 3 * 60)


def test_on_the_h200_run_the_split_correction_predicts_each_left_out_shape_within_a_quarter():
    (tensor_cores, rest), error = calibrate_model.calibrated("fast")
    assert tensor_cores > 1 and rest > tensor_cores  # the raw model is optimistic, most where it counts issue slots
    assert error < 0.25
    rms = {c: np.sqrt((calibrate_model.leave_one_out("fast", c) ** 2).mean()) for c in ("scale", "split")}
    assert rms["split"] < rms["scale"]  # the two parts explain more than one factor
    leave_one_out = calibrate_model.leave_one_out("fast", "split")
    assert len(leave_one_out) == len(calibrate_model.H200_RUN) and np.abs(leave_one_out).max() == pytest.approx(error)


def test_the_report_prints_every_correction_for_both_modes(capsys):
    calibrate_model.main()
    out = capsys.readouterr().out
    for mode in ("fast", "exact"):
        assert f"{mode}: raw static model, measured / predicted" in out
    assert out.count("leave-one-out error: RMS") == 6
