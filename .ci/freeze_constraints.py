"""Write constraints.txt from the environment this interpreter runs in: every installed release pinned (the test
command installs every extra but `triton36`, so one file bounds them all).

    python .ci/freeze_constraints.py > constraints.txt     # inside an environment that passed the suite

torch and triton are taken from the current constraints.txt, not from the environment: they move together and by
hand, because a CUDA build of torch requires one triton release (torch 2.13.0: triton==3.7.1) while the CPU build
requires none, so an environment built on the CPU would pin whichever triton was newest.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BY_HAND = ("torch", "triton")
HEADER = """\
# Every release the test suite runs against: README.md's test command installs under this file, and `.ci/run`
# runs that command in a fresh environment. Written by `python .ci/freeze_constraints.py` (see it); `bash .ci/run
# --newest` runs the suite on the newest releases and writes their pins to .ci/newest/constraints.txt, which
# replaces this file in a commit of its own once that run is green.
# torch and triton are pinned by hand: the CUDA build of torch 2.13.0 requires triton==3.7.1, and torch carries no
# local label here, so the CPU (+cpu) and CUDA builds of 2.13.0 both satisfy it.
"""


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_by_hand() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = {normalise(line.split("==")[0]): line for line in lines if "==" in line and not line.startswith("#")}
    return {name: pins[name] for name in BY_HAND}


def installed() -> dict[str, str]:
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout
    pins = {}
    for line in frozen.splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[normalise(name)] = f"{name}=={version}"
    return pins


def main() -> None:
    pins = {**installed(), **pins_by_hand()}
    sys.stdout.write(HEADER + "".join(pins[name] + "\n" for name in sorted(pins)))


if __name__ == "__main__":
    main()
