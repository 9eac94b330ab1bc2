#!/usr/bin/env bash
# The CPU learning recipe: 50 scripted transfer-cube demonstrations -> TinyACT -> success rate.
#
#   OMP_NUM_THREADS=1 bash bench/learning.sh [WORKDIR] [MAX_STEPS] [EVAL_EPISODES] [CURVE_EPISODES]
#
# Records 50 demonstrations (seed 0, the task's 240x320 rendering) into WORKDIR/data, trains
# gin_configs/tinyact.gin (frames fitted once to 60x80, chunks of 100, batch 32, AdamW 1e-3
# cosine, seed 42: the quickstart's run) saving a checkpoint every MAX_STEPS/3 steps, evaluates
# the final policy on
# EVAL_EPISODES simulated episodes with temporal ensembling (success rate, Wilson 95%
# interval), then writes the learning curve (loss, image sensitivity and, with
# CURVE_EPISODES > 0, success on that many episodes at every checkpoint) to
# WORKDIR/run/learning_curve_sim.{json,png}. Defaults: /tmp/ilstudio_learning, 3000 steps,
# 50 evaluation episodes, 10 per checkpoint. Prints the wall time of every stage.
# Measured (BENCHMARKS.md, "Learning: CPU recipe"): 49/50 = 98% at 3000 steps.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/ilstudio_learning}
STEPS=${2:-3000}
EPISODES=${3:-50}
CURVE=${4:-10}
export MUJOCO_GL=${MUJOCO_GL:-egl} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$WORK"
t0=$(date +%s)

python -m ilstudio.sim.record --task_name sim_transfer_cube_scripted --num_episodes 50 \
  --output_dir "$WORK/data" --seed 0 --no_progress
t1=$(date +%s); echo "recording: $(( t1 - t0 )) s"

python train.py --task_name=sim_transfer_cube_scripted --gin_file=gin_configs/tinyact.gin \
  --gin_bindings="task.dataset_dir = '$WORK/data'" \
  --output_dir="$WORK/run" --overwrite_output_dir --max_steps="$STEPS" --seed=42 \
  --per_device_train_batch_size=32 --learning_rate=1e-3 --lr_scheduler_type=cosine \
  --logging_steps=100 --save_steps=$(( STEPS / 3 )) --report_to=none \
  --training_arg=disable_tqdm=true 2>&1 | grep -E "'loss'|train_runtime" || true
t2=$(date +%s); echo "training: $(( t2 - t1 )) s for $STEPS steps"

python -m ilstudio.eval --checkpoint "$WORK/run" --num_episodes "$EPISODES" --no_progress \
  --temporal_ensemble
t3=$(date +%s); echo "evaluation: $(( t3 - t2 )) s for $EPISODES episodes"
echo "recipe wall time (record + train + evaluate): $(( t3 - t0 )) s"

python bench/learning_curve.py "$WORK/run" --episodes "$CURVE"
