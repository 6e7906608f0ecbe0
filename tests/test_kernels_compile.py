"""The Triton kernels compile for a Hopper GPU (sm_90) and fit its shared memory, checked on any machine.

The rest of the suite runs the kernels in Triton's interpreter when there is no GPU, and the interpreter accepts
some kernels that the compiler rejects or that need more shared memory than an SM has. `compile_for_gpu.py`
compiles every specialisation the launchers make; it needs TRITON_INTERPRET unset, hence the subprocess.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")


@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_nvidia_gpus(arch):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parent.parent), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", str(arch)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") >= 11, result.stdout
