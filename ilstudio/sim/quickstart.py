"""From nothing to a trained policy in one command (CPU-sized):

    python -m ilstudio.sim.quickstart

1. records ``--num_episodes`` scripted transfer-cube demonstrations into the task's
   dataset directory (data/sim_transfer_cube_scripted) unless they are already there
   (an interrupted recording continues where it stopped);
2. trains the CPU image policy (gin_configs/tinyact.gin: TinyACT, chunks of 100, trained
   from scratch) on them with train.py for ``--max_steps`` steps into ``--output_dir``;
3. evaluates it in the simulator in the policy's own evaluation mode (TinyACT: temporal
   ensembling, ``tinyact.temporal_ensemble``) for ``--eval_episodes`` episodes (0 skips): the
   success rate with its Wilson 95% interval, eval_results.json and GIFs of a successful and
   a failed episode in <output_dir>/evals/seed0_episodes<N>/ (``evals/latest.txt`` names the
   newest evaluation; re-evaluating adds a folder and keeps this one); then prints the wall
   time, CPU-minutes and peak memory of the whole command.

``--gin_file``, ``--gin_bindings`` and ``--gin_search_paths`` mean what they mean in train.py
and reach the recorder (task and sim.* settings) and the training run alike. Any other
``--flag`` is passed to train.py unchanged (e.g. ``--learning_rate=3e-4``).
"""

from __future__ import annotations

import subprocess
import sys
import time

from absl import flags

from ilstudio.cli import define_gin_flags, run_program

# The policy the quickstart trains (a CPU-sized one trained from scratch; gin_configs/default.gin
# is the LoRA VLA, which needs a backbone). --gin_file replaces it, as in train.py.
QUICKSTART_GIN_FILES = ["gin_configs/tinyact.gin"]


FLAGS = flags.FlagValues()  # this program's own: importable beside train.py's flags
flags.DEFINE_string("task_name", "sim_transfer_cube_scripted", "The simulated task "
                    "(gin_configs/tasks/<task_name>.gin).", flag_values=FLAGS)
flags.DEFINE_integer("num_episodes", 50, "Demonstrations to record.", lower_bound=1,
                     upper_bound=10**6, flag_values=FLAGS)
flags.DEFINE_integer("max_steps", 3000, "Training steps.", lower_bound=1, upper_bound=2**62,
                     flag_values=FLAGS)
flags.DEFINE_string("output_dir", "runs/quickstart", "Where this program writes: the run "
                    "directory (training output and evaluation results).", flag_values=FLAGS)
flags.DEFINE_integer("eval_episodes", 20, "Simulated evaluation episodes (0: skip).", lower_bound=0,
                     upper_bound=10**6, flag_values=FLAGS)
define_gin_flags(FLAGS, QUICKSTART_GIN_FILES)
_GROUPS = [("Quickstart", ["task_name", "num_episodes", "max_steps", "output_dir"]),
           ("Also", ["eval_episodes"])]


def _quickstart(train_flags: list[str]) -> int:
    from ilstudio.sim.config import load_task
    from ilstudio.sim.record import record

    start = time.monotonic()
    gin = [*(f"--gin_file={f}" for f in FLAGS.gin_file),
           *(f"--gin_bindings={b}" for b in FLAGS.gin_bindings),
           *(f"--gin_search_paths={d}" for d in FLAGS.gin_search_paths)]
    task, sim = load_task(FLAGS.task_name, FLAGS.gin_bindings, FLAGS.gin_file, FLAGS.gin_search_paths)
    print(f"[1/3] demonstrations: {FLAGS.num_episodes} episodes in {task.dataset_dir}", flush=True)
    summary = record(task, sim, task.dataset_dir, FLAGS.num_episodes)
    if summary["already_there"]:
        print(f"      {summary['already_there']} were already there", flush=True)
    print(f"[2/3] training ({', '.join(FLAGS.gin_file)}) for {FLAGS.max_steps} steps into "
          f"{FLAGS.output_dir}", flush=True)
    cmd = [sys.executable, "-m", "ilstudio.main", f"--task_name={FLAGS.task_name}",
           f"--output_dir={FLAGS.output_dir}", f"--max_steps={FLAGS.max_steps}",
           "--per_device_train_batch_size=32", "--learning_rate=1e-3", "--lr_scheduler_type=cosine",
           "--logging_steps=100",
           "--save_steps=1000", "--gin_bindings=dataset.preload_data = True", *gin, *train_flags]
    rc = subprocess.call(cmd)
    if rc != 0:
        return rc
    if FLAGS.eval_episodes > 0:
        print(f"[3/3] evaluating in the simulator ({FLAGS.eval_episodes} episodes)", flush=True)
        rc = subprocess.call([sys.executable, "-m", "ilstudio.eval", f"--checkpoint={FLAGS.output_dir}",
                              f"--num_episodes={FLAGS.eval_episodes}"])
    print(f"quickstart: {cost_line(time.monotonic() - start)}", flush=True)
    return rc


def cost_line(seconds: float) -> str:
    """Wall time, CPU time (this process and its children) and the largest process's peak
    resident memory: what a user needs to predict the quickstart on their own machine."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    peak = max(me.ru_maxrss, kids.ru_maxrss) * (1 if sys.platform == "darwin" else 1024)  # bytes
    return (f"{seconds / 60:.1f} min in all, {cpu / 60:.1f} CPU-minutes, peak memory "
            f"{peak / 2**30:.2f} GiB (the largest process)")


def main(argv: list[str] | None = None) -> int:
    """``python -m ilstudio.sim.quickstart`` / ``ilstudio-quickstart``; flags it does not define
    go to train.py unchanged."""
    return run_program(FLAGS, _quickstart, argv, __doc__, _GROUPS, known_only=True)


if __name__ == "__main__":
    sys.exit(main())
