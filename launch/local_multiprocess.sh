#!/usr/bin/env bash
# Runs N xclip_jax processes on this machine, one per slice of its devices, as a multi-host run
# would (for testing multi-process behaviour, or one process per GPU).
#
#   launch/local_multiprocess.sh [--dry-run] [--processes N] [--port P] [--cpu-devices D] -- ARGS...
#
# ARGS go to `python -m xclip_jax.main` (e.g. --config=configs/clip.py:demo --workdir=DIR).
# --cpu-devices D gives each process D fake CPU devices (XLA_FLAGS); without it, each process
# sees the machine's accelerators (set CUDA_VISIBLE_DEVICES per process yourself for GPUs).
# Logs go to <workdir or ./workdirs>/process_<i>.log; the script waits for every process and
# exits non-zero if any failed (75 if they saved after a preemption: run it again to resume).
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }

dry_run=0 processes=2 port=23456 cpu_devices="" python="${PYTHON:-.venv/bin/python}"
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --processes) processes="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --cpu-devices) cpu_devices="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "missing ARGS for xclip_jax.main after --" >&2; exit 2; }

logdir="workdirs"
for arg in "$@"; do
  case "$arg" in --workdir=*) logdir="${arg#--workdir=}" ;; esac
done

pids=()
for ((i = 0; i < processes; i++)); do
  env_prefix=()
  if [ -n "$cpu_devices" ]; then
    env_prefix=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$cpu_devices")
  fi
  cmd=("${env_prefix[@]}" "$python" -m xclip_jax.main "$@" "--coordinator_address=localhost:$port"
       "--num_processes=$processes" "--process_id=$i")
  if [ "$dry_run" = 1 ]; then
    printf '%q ' "${cmd[@]}"; printf '> %q 2>&1 &\n' "$logdir/process_$i.log"
    continue
  fi
  mkdir -p "$logdir"
  "${cmd[@]}" > "$logdir/process_$i.log" 2>&1 &
  pids+=("$!")
done
[ "$dry_run" = 1 ] && exit 0

# kill -TERM on this script is passed to every process (a preemption drill by hand).
forwarded=0
# shellcheck disable=SC2329  # invoked by the trap below
forward() { forwarded=1; kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap forward TERM
status=0
for pid in "${pids[@]}"; do
  code=0
  wait "$pid" || code=$?
  while [ "$forwarded" = 1 ] && [ "$code" -gt 128 ]; do   # cut short by the trap: wait again
    forwarded=0
    again=0
    wait "$pid" || again=$?
    [ "$again" = 127 ] && break                           # it had ended: $code was its own
    code=$again
  done
  [ "$code" = 0 ] || status=$code
done
exit "$status"
