#!/usr/bin/env bash
# The CPU learning recipes: 50 scripted demonstrations -> TinyACT -> success rate.
#
#   OMP_NUM_THREADS=1 bash bench/learning.sh [WORKDIR] [MAX_STEPS] [EVAL_EPISODES] [CURVE_EPISODES]
#   RECIPE=insertion OMP_NUM_THREADS=1 bash bench/learning.sh [WORKDIR] [MAX_STEPS] ...
#   RECIPE=vla OMP_NUM_THREADS=1 bash bench/learning.sh [WORKDIR] [MAX_STEPS] ...
#
# RECIPE=cube (default): sim_transfer_cube_scripted with gin_configs/tinyact.gin, 3000 steps.
# RECIPE=insertion: sim_insertion_scripted with gin_configs/insertion.gin (TinyACT plus colour
# keypoints, frames fitted to 120x160, the state never hidden, evaluated in chunks of 75 steps),
# MAX_STEPS default 5000, checkpoints every MAX_STEPS/4 (BENCHMARKS.md, "Learning: insertion":
# 50 demonstrations, 5000 steps, ~8.5 CPU-minutes of training; evaluation seeds 0-4: 167/250,
# 171/250 and 169/250 for training seeds 42, 0 and 1; this script evaluates seed 0's 50
# episodes: 35/50 with seed 42; the whole script: 1110 s of wall time on an idle 2-core machine).
# RECIPE=vla: the headline VLA (default.gin's policy) on sim_transfer_cube_scripted with
# gin_configs/vla_cube.gin (64x64 tower input, chunks of 100, state dropout 0.5, the keypoint
# token with its features also fed to the action head), MAX_STEPS default 6000,
# checkpoints every MAX_STEPS/6, evaluated in the policy's declared mode (BENCHMARKS.md,
# "Learning: the headline VLA").
# DEMOS (default 50): demonstrations recorded and trained on (episodes 0..DEMOS-1 of seed 0).
# Insertion keeps 50: DEMOS=150 with MAX_STEPS=7500 scores no higher over training seeds 42,
# 0 and 1 (evaluation seed 0: 51/150 against 65/150; DEMOS=100, seed 42: 25/100; BENCHMARKS.md
# "Learning: insertion"), for three times the recording. Recording insertion costs ~13 s
# of wall time per kept episode at load 3-4 (about 2.5 attempts each: the recorder keeps only
# episodes whose joint-space replay inserts too), so ~11 minutes for 50.
#
# Records DEMOS demonstrations (seed 0, the task's 240x320 rendering) into WORKDIR/data, trains
# the recipe's gin file (TinyACT: frames fitted once to 60x80, 120x160 for insertion, chunks of
# 100; batch 32, AdamW 1e-3 cosine, seed 42: the quickstart's run for the cube) saving a
# checkpoint every MAX_STEPS/3 steps (/4 for insertion), evaluates the final policy on
# EVAL_EPISODES simulated episodes in the policy's declared evaluation mode (tinyact.gin:
# temporal ensembling; insertion.gin: chunks of 75 steps; success rate, Wilson 95% interval),
# then writes the learning curve (loss, image sensitivity and, with CURVE_EPISODES > 0, success
# on that many episodes at every checkpoint, in the same mode)
# to WORKDIR/run/learning_curve_sim.{json,png}. Defaults: /tmp/ilstudio_learning[_insertion|_vla],
# 50 evaluation episodes, 10 per checkpoint. Prints the wall time of every stage.
# Measured (BENCHMARKS.md): cube 49/50 = 98% at 3000 steps; insertion: see "Learning: insertion";
# vla: 49/50 = 98% at 6000 steps (training seed 42, 24.6 CPU-min of training; seed 0: 48/50;
# 4/50 = 8% before the keypoint token), "Learning: the headline VLA".
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=${RECIPE:-cube}
case "$RECIPE" in
  cube) TASK=sim_transfer_cube_scripted; GIN=gin_configs/tinyact.gin; DEF_STEPS=3000
        DEF_WORK=/tmp/ilstudio_learning; PARTS=3 ;;
  insertion) TASK=sim_insertion_scripted; GIN=gin_configs/insertion.gin; DEF_STEPS=5000
             DEF_WORK=/tmp/ilstudio_learning_insertion; PARTS=4 ;;
  vla) TASK=sim_transfer_cube_scripted; GIN=gin_configs/vla_cube.gin; DEF_STEPS=6000
       DEF_WORK=/tmp/ilstudio_learning_vla; PARTS=6 ;;
  *) echo "RECIPE must be cube, insertion or vla, got '$RECIPE'" >&2; exit 2 ;;
esac
WORK=${1:-$DEF_WORK}
STEPS=${2:-$DEF_STEPS}
EPISODES=${3:-50}
CURVE=${4:-10}
export MUJOCO_GL=${MUJOCO_GL:-egl} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$WORK"
t0=$(date +%s)

python -m ilstudio.sim.record --task_name "$TASK" --num_episodes "${DEMOS:-50}" \
  --output_dir "$WORK/data" --seed 0 --no_progress
t1=$(date +%s); echo "recording: $(( t1 - t0 )) s"

python train.py --task_name="$TASK" --gin_file="$GIN" \
  --gin_bindings="task.dataset_dir = '$WORK/data'" \
  --output_dir="$WORK/run" --overwrite_output_dir --max_steps="$STEPS" --seed=42 \
  --per_device_train_batch_size=32 --learning_rate=1e-3 --lr_scheduler_type=cosine \
  --logging_steps=100 --save_steps=$(( STEPS / PARTS )) --report_to=none \
  --training_arg=disable_tqdm=true 2>&1 | grep -E "'loss'|train_runtime" || true
t2=$(date +%s); echo "training: $(( t2 - t1 )) s for $STEPS steps"

python -m ilstudio.eval --checkpoint "$WORK/run" --num_episodes "$EPISODES" --no_progress
t3=$(date +%s); echo "evaluation: $(( t3 - t2 )) s for $EPISODES episodes"
echo "recipe wall time (record + train + evaluate): $(( t3 - t0 )) s"

python bench/learning_curve.py "$WORK/run" --episodes "$CURVE"
