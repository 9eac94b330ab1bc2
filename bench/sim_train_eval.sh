#!/usr/bin/env bash
# The sim figure: record 50 scripted transfer-cube episodes, train the MLP policy (gin_configs/mlp.gin) on
# them, evaluate it in the simulator, and print the figures (recording time and size per
# episode, training time, success rate with its 95% interval).
#
#   OMP_NUM_THREADS=1 bash bench/sim_train_eval.sh [WORKDIR] [MAX_STEPS] [EVAL_EPISODES]
#
# Frames are rendered at 120x160 (sim.* bindings, carried into the run's operative config,
# so the evaluator renders the same way). Defaults: /tmp/ilstudio_sim_bench, 5000 steps, 20.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/ilstudio_sim_bench}
STEPS=${2:-5000}
EPISODES=${3:-20}
export MUJOCO_GL=${MUJOCO_GL:-egl} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SIZE=(--gin_bindings "sim.render_height = 120" --gin_bindings "sim.render_width = 160")
mkdir -p "$WORK"

python -m ilstudio.sim.record --task_name sim_transfer_cube_scripted --num_episodes 50 \
  --output_dir "$WORK/data" --seed 0 --no_progress "${SIZE[@]}"
du -sh "$WORK/data"

start=$(date +%s)
python train.py --task_name=sim_transfer_cube_scripted --gin_file=gin_configs/mlp.gin \
  --gin_bindings="task.dataset_dir = '$WORK/data'" \
  --gin_bindings="sim.render_height = 120" --gin_bindings="sim.render_width = 160" \
  --gin_bindings="dataset.preload_data = True" \
  --output_dir="$WORK/run" --overwrite_output_dir --max_steps="$STEPS" \
  --per_device_train_batch_size=32 --learning_rate=1e-3 --logging_steps=500 \
  --save_steps=1000 --report_to=none 2>&1 | grep -E "'loss'|train_runtime" || true
echo "training: $(( $(date +%s) - start )) s for $STEPS steps"

python -m ilstudio.eval --checkpoint "$WORK/run" --num_episodes "$EPISODES" --no_progress \
  --no_temporal_ensemble --output_dir "$WORK/eval_chunked"
python -m ilstudio.eval --checkpoint "$WORK/run" --num_episodes "$EPISODES" --no_progress \
  --temporal_ensemble --output_dir "$WORK/eval_te"
python -m ilstudio.eval --policy scripted --num_episodes "$EPISODES" --no_progress \
  --video_episodes 0 --output_dir "$WORK/eval_scripted" "${SIZE[@]}"
