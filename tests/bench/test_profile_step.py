"""`python -m bench.profile_step` keeps working between GPU loans: on the CPU it prints the same three parts (its
figures there say nothing about a GPU)."""

import pytest

from bench import profile_step


def test_the_profile_names_the_step_its_wall_time_and_where_the_host_spends_it(capsys):
    profile_step.main(["--provider", "torch", "--n", "64", "--k", "16", "--d", "8", "--steps", "4", "--rows", "5",
                       "--learning", "simvq", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.startswith("# torch, learning=simvq, N=64, K=16, D=8 on cpu")
    assert "step wall (median of 4):" in out
    assert "Self CPU time total" in out  # torch.profiler's table
    assert "Ordered by: internal time" in out and "Ordered by: cumulative time" in out  # cProfile's
    assert "vector_quantizer.py" in out  # the quantizer's own Python is in the host profile


def test_learning_is_refused_for_the_peer():
    with pytest.raises(SystemExit):
        profile_step.main(["--provider", "vector-quantize-pytorch", "--learning", "gradient", "--device", "cpu"])
