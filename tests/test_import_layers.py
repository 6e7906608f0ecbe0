"""The layout's promise: the kernels (vq_kernels, the folder kernels/) import nothing of vqvae, and the quantizer
library (vqvae.quantizer) imports nothing of the VQ-VAE application around it; and no name that the rename removed
is left anywhere but in the README's rename map."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(folder: Path, package: str) -> list[tuple[str, str]]:
    """(file, absolute module name) of every import statement in the folder's modules."""
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(path.name, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module if node.level == 0 else ".".join([package, *filter(None, [node.module])])
                found.append((path.name, module))
    return found


def test_the_kernels_import_nothing_of_vqvae():
    assert [(f, m) for f, m in imports(ROOT / "kernels", "vq_kernels") if m.split(".")[0] == "vqvae"] == []


def test_the_quantizer_library_imports_nothing_of_the_application():
    outside = [(f, m) for f, m in imports(ROOT / "vqvae" / "quantizer", "vqvae.quantizer")
               if m.split(".")[0] == "vqvae" and not m.startswith("vqvae.quantizer")]
    assert outside == []


def test_importing_the_library_loads_no_application_module():
    code = ("import sys, vqvae.quantizer, vqvae.quantizer.adapters; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('vqvae', 'kernels'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"TRITON_INTERPRET": "1", "PATH": ""}, cwd=ROOT / "tests").stdout.split()
    assert loaded and all(m == "vqvae" or m.startswith("vqvae.quantizer") for m in loaded), loaded


# The names the rename removed (README, "Changelog"), as they would be written in code or text.
REMOVED = [
    r"(?<!Sonnet's )(?<!Sonnet)\bVectorQuantizerEMA\b", r"\bResidualVectorQuantizerEMA\b",
    r"\brenamed_options\b", r"\bupgrade_state\b", r"\bRULE_BUFFERS\b", r"\bLEGACY\b", r"\bproportional_restarts\b",
    r"\bMovingFrame\b", r"\bLloydFit\b", r"\bWarmupDecay\b", r"\bDeadMemory\b", r"\bmemory_rows\b",
    r"(?<![\w.])kmeans_iters\b", r"\bdecode_codes\b", r"\bquantizer\.book\b", r"\.lookup\(",
    r"\bvqvae\.(rules|options|codebook|learning|backend|seeding|layout|sync|metrics|hub|adapters|residual|evaluation)\b",
    r"^\s*(import|from) kernels\b", r"\bours-no-(frame|lloyd|warmup|restarts|proportional|memory-floor)\b",
    r"\b(ours\+)?dead-memory\d", r"\blegacy\+(warmup|affine)\b",
]
SEARCHED = ("*.py", "*.md", "*.yaml", "*.sh", "*.toml")


def test_no_removed_name_is_left_outside_the_rename_map():
    pattern = re.compile("|".join(REMOVED), re.M)
    files = [p for glob in SEARCHED for p in ROOT.rglob(glob)
             if not {".git", ".venv", "build"} & set(p.relative_to(ROOT).parts) and p.name != Path(__file__).name]
    left = []
    for path in files:
        text = path.read_text(errors="replace")
        if path == ROOT / "README.md":  # the rename map names them once each
            text = text.split("## Changelog")[0]
        left += [f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
                 for m in pattern.finditer(text)]
    assert left == [], "\n".join(left[:40])
