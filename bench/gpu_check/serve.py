"""`python -m bench.gpu_check.serve serve --registry ...`: the gateway's own CLI (ops.cli.main), with two
additions for the GPU check, both read from the environment:

- GPU_CHECK_MEMORY_GB: cap this process's CUDA memory at that many GiB
  (torch.cuda.set_per_process_memory_fraction) before the gateway starts: a T4-sized process on a big card.
- GPU_CHECK_RECORD_MODULES: a file that gets, at exit, the top-level modules this process imported (the
  smoke run checks them against what the GPU machine has: bench.gpu_check.wheels).
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path


def record_modules(path: str) -> None:
    names = sorted({m.split(".")[0] for m in list(sys.modules)})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(names) + "\n")


def cap_memory(gib: float) -> None:
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check.serve: no CUDA device; memory cap of {gib:g} GiB not applied", flush=True)
        return
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    print(f"gpu_check.serve: memory cap {gib:g} GiB = {fraction:.4f} of {total / 2**30:.1f} GiB", flush=True)


def main() -> int:
    # As ops.cli does before torch is imported (OpenMP reads it once).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if os.environ.get("GPU_CHECK_RECORD_MODULES"):
        atexit.register(record_modules, os.environ["GPU_CHECK_RECORD_MODULES"])
    if os.environ.get("GPU_CHECK_MEMORY_GB"):
        cap_memory(float(os.environ["GPU_CHECK_MEMORY_GB"]))
    from ops.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
