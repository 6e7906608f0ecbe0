"""DIR/report.json: the report's raw figures, to which every stage adds its part while it runs.

Each write replaces the file whole (a temporary file, then a rename), so a stage killed at its time limit leaves
the last complete version behind, with every figure it had written. Only one process writes at a time: the
supervisor between stages, a stage while it runs.
"""

import json
import os
from pathlib import Path

REPORT_JSON = "report.json"


def load(out: Path) -> dict:
    path = Path(out) / REPORT_JSON
    return json.loads(path.read_text()) if path.exists() else {}


def save(out: Path, report: dict) -> None:
    path = Path(out) / REPORT_JSON
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=1, default=str))
    os.replace(partial, path)


def update(out: Path, section: str, **fields) -> None:
    """Set `fields` in the report's `section`, keeping the section's other fields."""
    report = load(out)
    report.setdefault(section, {}).update(fields)
    save(out, report)


def append(out: Path, section: str, field: str, item) -> None:
    """Add one item (a timed case, say) to the list report[section][field]."""
    report = load(out)
    report.setdefault(section, {}).setdefault(field, []).append(item)
    save(out, report)


def remove_partial(out: Path) -> None:
    """The temporary file of a write that a kill cut short, if any."""
    (Path(out) / (REPORT_JSON + ".partial")).unlink(missing_ok=True)
