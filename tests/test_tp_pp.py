"""Tensor and pipeline parallel, alone and composed with FSDP, on gloo: parity with one process.

Every layout trains the debug model (6 blocks, 16 heads, FFN 768, vocab 2256) for 3 steps on the
same global batch (4 x 64) and seed as one process, and must give the same losses (every rank
logs the loss of the last pipeline stage) and the same final parameters, gathered from every
rank. Tolerances are those of the FSDP tests (tests/layouts.py).
"""

import pytest
from layouts import assert_matches, run_layout

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TP2 = ["--parallelism.tensor_parallel_degree", "2"]
PP2 = ["--parallelism.pipeline_parallel_degree", "2"]

TWO_RANKS = {
    "tp2-loss-parallel": [*TP2, "--training.local_batch_size", "4"],
    "tp2-gathered-logits": [*TP2, "--training.local_batch_size", "4",
                            "--parallelism.enable_loss_parallel", "false"],
    "pp2-gpipe": [*PP2, "--training.local_batch_size", "4",
                  "--parallelism.pipeline_parallel_schedule", "GPipe"],
    "pp2-1f1b": [*PP2, "--training.local_batch_size", "4",
                 "--parallelism.pipeline_parallel_schedule", "1F1B"],
    # 2 stages per rank: blocks 0-1 | 2 | 3-4 | 5, placed round-robin.
    "pp2-interleaved-split-points": [
        *PP2, "--training.local_batch_size", "4",
        "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
        "--parallelism.pipeline_parallel_split_points", "layers.2,layers.3,layers.5"],
    # 1 block per stage: 6 stages, 3 per rank; micro-batches of 2 sequences.
    "pp2-interleaved-layers-per-stage-ac": [
        *PP2, "--training.local_batch_size", "4",
        "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
        "--parallelism.pipeline_parallel_layers_per_stage", "1",
        "--parallelism.pipeline_parallel_microbatch_size", "2",
        "--activation_checkpoint.mode", "full"],
}
FOUR_RANKS = {
    "fsdp2-tp2": [*TP2, "--training.local_batch_size", "2"],
    "fsdp2-tp2-offload-ac": [*TP2, "--training.local_batch_size", "2",
                             "--training.enable_cpu_offload", "true",
                             "--activation_checkpoint.mode", "selective"],
    "fsdp2-pp2": [*PP2, "--training.local_batch_size", "2"],
    "replicate2-pp2": [*PP2, "--training.local_batch_size", "2",
                       "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "1"],
    "tp2-pp2-interleaved": [*TP2, *PP2, "--training.local_batch_size", "4",
                            "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B"],
}


@pytest.mark.parametrize("layout", TWO_RANKS)
def test_two_rank_tp_and_pp_layouts_match_one_process(tmp_path, reference, layout):
    assert_matches(run_layout(tmp_path, layout, 2, *TWO_RANKS[layout]), reference)


@pytest.mark.four_ranks
@pytest.mark.parametrize("layout", FOUR_RANKS)
def test_four_rank_compositions_match_one_process(tmp_path, reference, layout):
    assert_matches(run_layout(tmp_path, layout, 4, *FOUR_RANKS[layout]), reference)

