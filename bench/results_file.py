"""The results file a benchmark writes: what it measured, with the command, the machine and the date.

python -c "import sys; sys.path.insert(0, 'bench'); import results_file; print(results_file.machine())"
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path


def machine() -> str:
    """e.g. x86_64-2c: the processor's architecture and its cores."""
    return f"{platform.machine()}-{os.cpu_count()}c"


def write(out_dir: str | Path, name: str, fields: dict, suffix: str = "") -> Path:
    """`out_dir/NAME-MACHINE-DATE[SUFFIX].json`: `fields`, after the command that ran (this script and its
    arguments), the machine, its load average and the date. Returns the path, and says it."""
    doc = {
        "command": shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        **fields,
        "machine": machine(),
        "load_average": os.getloadavg(),
        "date": datetime.date.today().isoformat(),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{doc['machine']}-{doc['date']}{suffix}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"written: {path}")
    return path
