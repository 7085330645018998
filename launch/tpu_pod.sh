#!/usr/bin/env bash
# Trains on a Cloud TPU pod slice: create (or reuse) the TPU VM, copy this checkout to every
# worker, install, run the same command on all workers, and optionally delete the VM.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --type v5p-64 [--version tpu-ubuntu2204-base]
#                     [--project P] [--spot | --queued] [--delete-after] [--dry-run] -- ARGS...
#
# ARGS go to `python -m xclip_jax.main` on every worker (e.g. --config=configs/declip.py:vit_b32
# --workdir=gs://bucket/run). On a pod slice jax.distributed finds its peers by itself.
# --queued requests a queued resource (waits for capacity); --spot asks for spot capacity.
# --dry-run prints every gcloud command instead of running it.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

name="" zone="" type="" version="tpu-ubuntu2204-base" project="" spot=0 queued=0 delete_after=0
dry_run=0
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

common=(--zone="$zone")
[ -n "$project" ] && common+=(--project="$project")

run() {
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# 1. The VM: reuse it if it exists, else create it (directly or as a queued resource).
if [ "$dry_run" = 0 ] && gcloud compute tpus tpu-vm describe "$name" "${common[@]}" >/dev/null 2>&1; then
  echo "Reusing TPU VM $name."
elif [ "$queued" = 1 ]; then
  extra=()
  [ "$spot" = 1 ] && extra+=(--spot)
  run gcloud compute tpus queued-resources create "$name" --node-id="$name" \
    --accelerator-type="$type" --runtime-version="$version" "${common[@]}" "${extra[@]}"
  if [ "$dry_run" = 0 ]; then
    until gcloud compute tpus queued-resources describe "$name" "${common[@]}" \
        --format='value(state.state)' | grep -q ACTIVE; do sleep 30; done
  fi
else
  extra=()
  [ "$spot" = 1 ] && extra+=(--spot)
  run gcloud compute tpus tpu-vm create "$name" --accelerator-type="$type" \
    --version="$version" "${common[@]}" "${extra[@]}"
fi

# 2. Code and environment on every worker.
archive="/tmp/xclip_jax_${name}.tar.gz"
run tar czf "$archive" --exclude=.venv --exclude=workdirs --exclude=.git .
run gcloud compute tpus tpu-vm scp "$archive" "$name:~/xclip_jax.tar.gz" --worker=all "${common[@]}"
run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${common[@]}" --command \
  "mkdir -p ~/xclip_jax && tar xzf ~/xclip_jax.tar.gz -C ~/xclip_jax && cd ~/xclip_jax && bash launch/venv.sh tpu"

# 3. The same command on every worker.
printf -v main_args '%q ' "$@"
run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${common[@]}" --command \
  "cd ~/xclip_jax && .venv/bin/python -m xclip_jax.main $main_args"

# 4. Tear down.
if [ "$delete_after" = 1 ]; then
  if [ "$queued" = 1 ]; then
    run gcloud compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
  fi
fi
