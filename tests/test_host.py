"""The cores the gateway sizes its threads by honour a container's CPU limit (a cgroup CPU quota), read from
the real kernel interface where this machine lets a test make a cgroup, and from cgroup v2 files as a
container sees them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from core.host import cpu_cores, cpu_quota_cores

REPO = Path(__file__).resolve().parent.parent
V1_CPU = Path("/sys/fs/cgroup/cpu")

PROBE = (
    "from core.host import cpu_cores, cpu_quota_cores, cpu_stream_split\n"
    "from engine.lanes import default_bulk_threads, default_small_threads\n"
    "print(cpu_cores(), cpu_quota_cores(), *cpu_stream_split(), default_bulk_threads(), default_small_threads(), default_small_threads(False))\n"
)


def _probe(cgroup_procs: Path | None) -> list[str]:
    enter = f"echo $$ > {cgroup_procs} && " if cgroup_procs else ""
    out = subprocess.run(
        ["sh", "-c", f'{enter}exec "{sys.executable}" -c "$PROBE"'],
        env={**os.environ, "PROBE": PROBE, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(not (os.access(V1_CPU, os.W_OK) and (V1_CPU / "cpu.cfs_quota_us").exists()), reason="needs a writable cgroup v1 cpu controller (root)")
def test_a_process_in_a_one_cpu_quota_sizes_its_threads_for_one_core() -> None:
    if cpu_cores() < 2:
        pytest.skip("needs two cores to tell a quota from the affinity")
    group = V1_CPU / f"rerank-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")
        cores, quota, streams, threads, bulk, small, small_gpu = _probe(group / "cgroup.procs")
        assert (cores, float(quota), streams, threads, small, small_gpu) == ("1", 1.0, "1", "1", "1", "1")
        assert bulk == "2"  # the bulk lane keeps its floor of two (one big request does not hold it)
        # Outside that group: what this process has (every core where no quota is set).
        free = _probe(None)
        assert free[:3] == [str(cpu_cores()), str(cpu_quota_cores()), "2"]
    finally:
        group.rmdir()


def test_cgroup_v2_quota_is_the_smallest_on_the_path_and_the_mount_root_in_a_container(tmp_path: Path) -> None:
    fs = tmp_path / "sys-fs-cgroup"
    (fs / "kubepods" / "pod1" / "c1").mkdir(parents=True)
    (fs / "cpu.max").write_text("max 100000\n")
    (fs / "kubepods" / "cpu.max").write_text("800000 100000\n")
    (fs / "kubepods" / "pod1" / "cpu.max").write_text("250000 100000\n")
    (fs / "kubepods" / "pod1" / "c1" / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1/c1\n")
    assert cpu_quota_cores(str(proc), str(fs)) == 2.5
    # In the container's own cgroup namespace the path is "/" and the mount's root is the container.
    proc.write_text("0::/\n")
    (fs / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota_cores(str(proc), str(fs)) == 1.5
    # A path that is not mounted here (the host's, seen without a namespace): the mount root still counts.
    proc.write_text("0::/elsewhere/c9\n")
    assert cpu_quota_cores(str(proc), str(fs)) == 1.5
    # No limit anywhere, or nothing readable: no quota.
    (fs / "cpu.max").write_text("max 100000\n")
    assert cpu_quota_cores(str(proc), str(fs)) is None
    assert cpu_quota_cores(str(tmp_path / "missing"), str(fs)) is None


def test_cgroup_v1_quota_minus_one_is_no_limit(tmp_path: Path) -> None:
    mount = tmp_path / "cpu,cpuacct"
    (mount / "docker" / "abc").mkdir(parents=True)
    (mount / "docker" / "abc" / "cpu.cfs_quota_us").write_text("-1\n")
    (mount / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("5:cpu,cpuacct:/docker/abc\n")
    assert cpu_quota_cores(str(proc), str(tmp_path)) is None
    (mount / "docker" / "abc" / "cpu.cfs_quota_us").write_text("300000\n")
    assert cpu_quota_cores(str(proc), str(tmp_path)) == 3.0
