#!/usr/bin/env bash
# Trains on a Cloud TPU pod slice: create (or reuse) the TPU VM, copy this checkout to every
# worker, install Python 3.12 and the package, run the same command on all workers, and
# optionally delete the VM.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --type v5p-64 [--version tpu-ubuntu2204-base]
#                     [--project P] [--spot | --queued] [--requeue N] [--delete-after]
#                     [--dry-run] -- ARGS...
#
# ARGS go to `python -m xclip_jax.main` on every worker (e.g. --config=configs/declip.py:vit_b32
# --workdir=gs://bucket/run). On a pod slice jax.distributed finds its peers by itself.
# --queued requests a queued resource (waits for capacity); --spot asks for spot capacity.
# --dry-run prints every gcloud command instead of running it.
# Preemption (a maintenance event, or spot/queued capacity taken back): the workers' processes
# get SIGTERM, agree on one step, save it to the workdir and exit 75 ("resumable"), or the slice
# goes away (state PREEMPTED, or the queued resource SUSPENDED/FAILED). --requeue N then starts
# again up to N times: deletes and recreates a slice that was taken away, reinstalls, and runs the
# same command, which resumes from the saved step. Without --requeue, run this script again.
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

# xclip_jax.main's status for "saved after a preemption, resume me" (parallel/multihost.py).
REQUEUE_STATUS=75

name="" zone="" type="" version="tpu-ubuntu2204-base" project="" spot=0 queued=0 delete_after=0
dry_run=0 requeue=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --requeue) requeue="$2"; shift 2 ;;
    --delete-after) delete_after=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
for required in name zone type; do
  [ -n "${!required}" ] || { echo "--$required is required (see --help)" >&2; exit 2; }
done
[ $# -gt 0 ] || { echo "missing ARGS for xclip_jax.main after --" >&2; exit 2; }
case "$requeue" in ''|*[!0-9]*) echo "--requeue takes a count, got '$requeue'" >&2; exit 2 ;; esac

common=(--zone="$zone")
[ -n "$project" ] && common+=(--project="$project")

run() {
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# The slice's state: READY, PREEMPTED, ... for a TPU VM; ACTIVE, SUSPENDED, ... for a queued
# resource; empty if it does not exist.
slice_state() {
  if [ "$queued" = 1 ]; then
    gcloud compute tpus queued-resources describe "$name" "${common[@]}" \
      --format='value(state.state)' 2>/dev/null || true
  else
    gcloud compute tpus tpu-vm describe "$name" "${common[@]}" --format='value(state)' \
      2>/dev/null || true
  fi
}

delete_slice() {
  if [ "$queued" = 1 ]; then
    run gcloud compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
  fi
}

# 1. The VM: reuse it while it runs; one that was taken away is deleted and created again.
ensure_slice() {
  local state=""
  [ "$dry_run" = 0 ] && state="$(slice_state)"
  case "$state" in
    READY|ACTIVE) echo "Reusing TPU slice $name ($state)."; return ;;
    "") ;;
    *) echo "TPU slice $name is $state: deleting it to create it again." >&2; delete_slice ;;
  esac
  local extra=()
  [ "$spot" = 1 ] && extra+=(--spot)
  if [ "$queued" = 1 ]; then
    run gcloud compute tpus queued-resources create "$name" --node-id="$name" \
      --accelerator-type="$type" --runtime-version="$version" "${common[@]}" "${extra[@]}"
    if [ "$dry_run" = 0 ]; then
      until [ "$(slice_state)" = ACTIVE ]; do sleep 30; done
    fi
  else
    run gcloud compute tpus tpu-vm create "$name" --accelerator-type="$type" \
      --version="$version" "${common[@]}" "${extra[@]}"
  fi
}

# 2. Code and environment on every worker. The TPU images ship Python 3.10 (Ubuntu 22.04):
# Python 3.12 comes from the deadsnakes PPA where the image lacks it.
archive="/tmp/xclip_jax_${name}.tar.gz"
install() {
  run tar czf "$archive" --exclude=.venv --exclude=.venv-torch --exclude=workdirs --exclude=.git .
  run gcloud compute tpus tpu-vm scp "$archive" "$name:~/xclip_jax.tar.gz" --worker=all \
    "${common[@]}"
  local python312="command -v python3.12 >/dev/null || { sudo add-apt-repository -y"
  python312+=" ppa:deadsnakes/ppa && sudo apt-get update -q"
  python312+=" && sudo apt-get install -y -q python3.12 python3.12-venv; }"
  run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${common[@]}" --command \
    "$python312 && mkdir -p ~/xclip_jax && tar xzf ~/xclip_jax.tar.gz -C ~/xclip_jax \
&& cd ~/xclip_jax && PYTHON=python3.12 bash launch/venv.sh tpu"
}

# 3. The same command on every worker; each reports its exit status on a line of its own.
printf -v main_args '%q ' "$@"
log="/tmp/xclip_jax_${name}.log"
run_main() {
  if [ "$dry_run" = 1 ]; then
    run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${common[@]}" --command \
      "cd ~/xclip_jax && .venv/bin/python -m xclip_jax.main $main_args"
    return 0
  fi
  local ssh_status=0
  # shellcheck disable=SC2016  # expanded on the worker, not here
  local report='s=$?; echo "xclip_jax exit status $s on $(hostname)"; exit $s'
  gcloud compute tpus tpu-vm ssh "$name" --worker=all "${common[@]}" --command \
    "cd ~/xclip_jax && .venv/bin/python -m xclip_jax.main $main_args; $report" \
    2>&1 | tee "$log" || ssh_status=$?
  return "$ssh_status"
}

# What the last attempt ended as: finished, resumable (saved after a preemption, or the slice was
# taken away) or failed.
outcome() {
  local statuses
  statuses="$(grep -o 'xclip_jax exit status [0-9]*' "$log" | awk '{print $4}' | sort -u || true)"
  if [ -n "$statuses" ] && [ "$statuses" = 0 ]; then echo finished; return; fi
  if printf '%s\n' "$statuses" | grep -qx "$REQUEUE_STATUS"; then echo resumable; return; fi
  case "$(slice_state)" in
    READY|ACTIVE) echo failed ;;
    *) echo resumable ;;        # preempted (or gone) before a worker could report
  esac
}

attempt=0
status=0
while :; do
  ensure_slice
  install
  status=0
  run_main || status=$?
  [ "$dry_run" = 1 ] && break
  result="$(outcome)"
  echo "Attempt $((attempt + 1)): $result (ssh status $status)."
  case "$result" in
    finished) status=0; break ;;
    resumable)
      status="$REQUEUE_STATUS"
      if [ "$attempt" -ge "$requeue" ]; then
        echo "Resumable: run the same command again to continue from the saved step." >&2
        break
      fi
      attempt=$((attempt + 1))
      echo "Requeueing ($attempt of $requeue): the run resumes from its saved step." >&2 ;;
    *) [ "$status" = 0 ] && status=1; break ;;
  esac
done

# 4. Tear down.
if [ "$delete_after" = 1 ]; then
  delete_slice
fi
exit "$status"
