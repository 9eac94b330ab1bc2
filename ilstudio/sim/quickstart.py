"""From nothing to a trained policy in one command (CPU-sized):

    python -m ilstudio.sim.quickstart

1. records ``--num_episodes`` scripted transfer-cube demonstrations into the task's
   dataset directory (data/sim_transfer_cube_scripted) unless they are already there
   (an interrupted recording continues where it stopped);
2. trains the CPU image policy (gin_configs/tinyact.gin: TinyACT, action chunks of 100)
   on them with train.py for ``--max_steps`` steps into ``--output_dir``;
3. evaluates it in the simulator with temporal ensembling for ``--eval_episodes`` episodes
   (0 skips): success rate with its Wilson 95% interval, <output_dir>/eval_results.json and
   a GIF of the first episode.

Any further ``--flag`` is passed to train.py unchanged (e.g. ``--learning_rate=3e-4``); a
``--gin_file`` replaces the recipe's (e.g. ``--gin_file=gin_configs/act.gin``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from ilstudio.errors import UserError


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m ilstudio.sim.quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task_name", default="sim_transfer_cube_scripted")
    p.add_argument("--num_episodes", type=int, default=50, help="demonstrations to record")
    p.add_argument("--max_steps", type=int, default=3000, help="training steps")
    p.add_argument("--output_dir", default="runs/quickstart")
    p.add_argument("--eval_episodes", type=int, default=20, help="simulated evaluation episodes (0: skip)")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, train_flags = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.monotonic()
    try:
        from ilstudio.sim.config import load_task
        from ilstudio.sim.record import record

        task, sim = load_task(args.task_name)
        print(f"[1/3] demonstrations: {args.num_episodes} episodes in {task.dataset_dir}", flush=True)
        summary = record(task, sim, task.dataset_dir, args.num_episodes)
        if summary["already_there"]:
            print(f"      {summary['already_there']} were already there", flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    recipe = ([] if any(f.startswith("--gin_file") for f in train_flags)
              else ["--gin_file=gin_configs/tinyact.gin", "--lr_scheduler_type=cosine"])
    print(f"[2/3] training the policy for {args.max_steps} steps into {args.output_dir}",
          flush=True)
    cmd = [sys.executable, "-m", "ilstudio.main", f"--task_name={args.task_name}",
           f"--output_dir={args.output_dir}", f"--max_steps={args.max_steps}",
           "--per_device_train_batch_size=32", "--learning_rate=1e-3", "--logging_steps=100",
           "--save_steps=1000", "--gin_bindings=dataset.preload_data = True", *recipe,
           *train_flags]
    rc = subprocess.call(cmd)
    if rc != 0:
        return rc
    if args.eval_episodes > 0:
        print(f"[3/3] evaluating in the simulator ({args.eval_episodes} episodes)", flush=True)
        rc = subprocess.call([sys.executable, "-m", "ilstudio.eval", "--checkpoint", args.output_dir,
                              "--num_episodes", str(args.eval_episodes), "--temporal_ensemble"])
    print(f"quickstart: {(time.monotonic() - start) / 60:.1f} min in all", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
