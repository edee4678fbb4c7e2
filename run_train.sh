#!/usr/bin/env bash
# Launch titan_lite on this machine: ./run_train.sh --config train_configs/llama3_8b.toml
#   NGPU      processes: default one per visible GPU (CUDA_VISIBLE_DEVICES applies), or 1
#             without a GPU (CPU ranks with gloo); NGPU=1 uses one GPU of several
#   LOG_RANK  which ranks' output to show besides rank 0 (comma-separated); default 0
# The console (as shown) is also kept in <job.dump_folder>/logs/run-<date>.log.
# --estimate: print the per-rank memory estimate for NGPU ranks instead of training.
# Other arguments go to the trainer, e.g. --training.steps 20.
set -euo pipefail
cd "$(dirname "$0")"

LOG_RANK=${LOG_RANK:-0}
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug_model.toml}

overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG_FILE="$2"; shift 2 ;;
    --config=*) CONFIG_FILE="${1#--config=}"; shift ;;
    --estimate) ESTIMATE=1; shift ;;
    *) overrides+=("$1"); shift ;;
  esac
done

if ! GPUS=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null); then
  echo "run_train.sh: torch is not importable; see README.md (pip install torch==2.13.0 && pip install -e .)" >&2
  exit 2
fi
if [[ -z "${NGPU:-}" ]]; then  # as torchrun --nproc-per-node gpu: every visible GPU
  NGPU=$(( GPUS > 0 ? GPUS : 1 ))
  if (( GPUS > 1 )); then
    echo "run_train.sh: $GPUS GPUs visible: launching $NGPU processes (NGPU=1 for one)"
  fi
fi
if [[ -n "${ESTIMATE:-}" ]]; then  # memory estimate for NGPU ranks: no training, no GPU needed
  exec python -m titan_lite.estimate --config "$CONFIG_FILE" --estimate.num_gpus "$NGPU" \
    "${overrides[@]}"
fi
for arg in "${overrides[@]}"; do
  if [[ "$arg" == "--help" || "$arg" == "-h" ]]; then exec python -m titan_lite.train --help; fi
done
# Check the config once, up front: a mistake exits 2 with one line per problem, no traceback.
DUMP_FOLDER=$(WORLD_SIZE="$NGPU" python -m titan_lite.config --get job.dump_folder \
  --config "$CONFIG_FILE" "${overrides[@]}")

# Keep the console: a crash at night can be read in the morning.
mkdir -p "$DUMP_FOLDER/logs"
LOG_FILE="$DUMP_FOLDER/logs/run-$(date +%Y%m%d-%H%M%S).log"
echo "run_train.sh: $NGPU process(es); console kept in $LOG_FILE"
exec > >(tee -a "$LOG_FILE") 2> >(tee -a "$LOG_FILE" >&2)

# Split the cores between the ranks: CPU ranks compute with them, and with
# training.enable_cpu_offload the optimizer step runs on them (torchrun alone would pin every
# rank of a multi-GPU job to one thread).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NGPU > 0 ? $(nproc) / NGPU : 1 ))}

# titan_lite.runtime.launch is torchrun that exits 2, without a traceback, when the trainer refuses the job.
exec python -m titan_lite.runtime.launch --standalone --nproc_per_node="$NGPU" --local-ranks-filter "0,$LOG_RANK" --role rank \
  --tee 3 -m titan_lite.train --config "$CONFIG_FILE" "${overrides[@]}"
