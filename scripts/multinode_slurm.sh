#!/usr/bin/env bash
# Train on several nodes under Slurm: one torchrun agent per node (srun), joined by torchrun's
# c10d rendezvous on the first node, as torchtitan's multinode_trainer.slurm does.
#   sbatch --nodes 2 --gpus-per-node 8 scripts/multinode_slurm.sh --config train_configs/llama3_8b.toml
# Prepare the data first, once, on any CPU machine (the nodes then start at once):
#   python -m titan_lite.data prepare --config train_configs/llama3_8b.toml
# With data.cache_dir on a filesystem every node sees, the nodes share one cache (built together
# if it is missing); otherwise each node builds its own.
#SBATCH --job-name=titan_lite
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

NODES=${SLURM_JOB_NUM_NODES:?run under sbatch or salloc}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}
CONFIG_FILE=train_configs/debug_model.toml
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG_FILE="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
# check the config once before any node starts (a mistake: one line per problem, exit 2)
WORLD_SIZE=$(( NODES * GPUS_PER_NODE )) python -m titan_lite.config --get job.dump_folder \
  --config "$CONFIG_FILE" "${args[@]}" > /dev/null
echo "multinode_slurm.sh: $NODES nodes x $GPUS_PER_NODE GPUs, rendezvous at $HEAD:$PORT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / GPUS_PER_NODE > 0 ? $(nproc) / GPUS_PER_NODE : 1 ))}
srun --kill-on-bad-exit=1 python -m titan_lite.runtime.launch --nnodes "$NODES" \
  --nproc-per-node "$GPUS_PER_NODE" --rdzv-id "${SLURM_JOB_ID}" --rdzv-backend c10d \
  --rdzv-endpoint "$HEAD:$PORT" --local-ranks-filter 0 --role rank --tee 3 \
  -m titan_lite.train --config "$CONFIG_FILE" "${args[@]}"
