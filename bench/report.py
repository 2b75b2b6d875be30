"""What a benchmark's command line ends with: the run in a working folder (a temporary one unless given),
its results as JSON where asked, its markdown on stdout."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable


def run_and_report(
    run: Callable[[Path], dict[str, Any]], work: Path | None, json_path: Path | None, markdown: Callable[[dict[str, Any]], str]
) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        res = run(work or Path(tmp))
    if json_path is not None:
        json_path.write_text(json.dumps(res, indent=2))
    print(markdown(res))
    return 0
