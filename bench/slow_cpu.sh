#!/usr/bin/env bash
# Run a command as on the project's slow machine kind (AMD EPYC, 2 cores, neither AMX nor AVX512-BF16, every
# model in fp32, ~3x slower on the test suite than the Intel Xeon with AMX), on that Xeon:
#   - /proc/cpuinfo without the amx_* and avx512* flags (a bind mount in a private mount namespace), so the
#     gateway's CPU-kind detection (core/budgets.cpu_kind, backends/base.cpu_has_fast_bf16) picks fp32 and
#     the "other" CPU budgets, as it does there;
#   - MKL (torch's fp32 matrix products) capped at AVX2 (MKL_ENABLE_INSTRUCTIONS), as on an AVX2 EPYC.
#     Not ATen or oneDNN (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA): capped below what the CPU reports, an
#     explicit bfloat16 model fails in SDPA ("pack_vnni2 is only supported when avx512 is supported") and
#     OpenVINO's CPU plugin cannot compile int8 models, which an EPYC does not do; their other kernels keep
#     AVX-512 (a little faster than the EPYC's AVX2, which the quota below more than takes back);
#   - a CPU quota (cgroup v1 cpu.cfs_quota_us) of SLOW_CPU_SHARE x cores, in 10 ms periods so the
#     throttling is fine-grained. The quota is the group's total, not a cap per core: the process sees 2
#     cores, one thread alone may take 0.9 of a core, and two busy threads share 0.9 between them. So work
#     spread over both cores gains nothing here that it would on two slow cores, while one thread alone
#     runs twice as fast as on one of them: a suite in one process looks faster here than it would be there.
#     The quota itself is hidden from the command (an empty tmpfs over the cgroup's cpu controller in the
#     same private mount namespace): the slow kind has two real cores and no quota, so the gateway
#     (core.host.cpu_cores caps the affinity by a quota) and `make test` must size themselves for two.
# Needs root (mount namespace, cgroup). Usage: bench/slow_cpu.sh make test
set -euo pipefail
SHARE="${SLOW_CPU_SHARE:-0.45}"
PERIOD_US=10000
[ "$(id -u)" = 0 ] || { echo "bench/slow_cpu.sh needs root (mount namespace and cgroup)" >&2; exit 2; }
[ $# -gt 0 ] || { echo "usage: bench/slow_cpu.sh COMMAND..." >&2; exit 2; }
cores=$(nproc)
quota=$(python3 -c "print(int($SHARE * $cores * $PERIOD_US))")
fake=$(mktemp /tmp/slow-cpuinfo.XXXXXX)
sed -E -e '/^flags/ s/ (amx_[a-z0-9_]+|avx512[a-z0-9_]*)//g' \
       -e 's/^model name.*/model name\t: AMD EPYC (emulated on this Xeon by bench\/slow_cpu.sh)/' /proc/cpuinfo > "$fake"
cg=/sys/fs/cgroup/cpu/slow-cpu.$$
mkdir "$cg"
echo "$PERIOD_US" > "$cg/cpu.cfs_period_us"
echo "$quota" > "$cg/cpu.cfs_quota_us"
cleanup() {
  # Move ourselves out before removing the group (a group with tasks cannot be removed).
  echo $$ > /sys/fs/cgroup/cpu/cgroup.procs 2>/dev/null || true
  rmdir "$cg" 2>/dev/null || true
  rm -f "$fake"
}
trap cleanup EXIT
echo "slow CPU emulation: $cores cores at ${SHARE} each (quota ${quota}us / ${PERIOD_US}us), fp32, MKL at AVX2" >&2
status=0
( echo $BASHPID > "$cg/cgroup.procs"
  exec unshare --mount --propagation private -- bash -c 'mount --bind "$0" /proc/cpuinfo && mount -t tmpfs -o size=1m none "$1" && shift && exec "$@"' "$fake" "$(dirname "$cg")" \
    env MKL_ENABLE_INSTRUCTIONS=AVX2 "$@" ) || status=$?
exit $status
