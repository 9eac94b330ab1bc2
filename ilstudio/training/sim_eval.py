"""Evaluation in the simulator during training: ``--eval_every_steps=N --eval_episodes=K``.

Every N optimizer steps (and at the last step) the current weights, the EMA weights when
``model.using_ema``, the ones checkpoints carry, are rolled out for K episodes by the same
agent and loop as ``python -m ilstudio.eval`` (ilstudio/sim/rollout.py). Then:

* success rate and mean return are logged like any training metric (``eval_sim_*`` in
  ``trainer_state.json``'s log history, ``eval/sim_*`` in TensorBoard), plus the first
  episode as an animated image in TensorBoard when ``--report_to`` includes tensorboard;
* ``<output_dir>/best/`` holds the weights with the highest success rate so far (ties: the
  higher mean return; a full tie keeps the earlier one), with ``best.json`` saying which step
  and what it scored. It is written into a staging directory and renamed into place
  (``rundir.atomic_dir``), so a best/ that exists is complete;
  ``python -m ilstudio.eval --checkpoint <output_dir>/best`` evaluates it;
* ``learning_curve.png`` (loss and success rate against steps) is redrawn.

Only the main process rolls out. The rollouts use evaluation seed ``SELECTION_SEED`` (1);
``python -m ilstudio.eval`` defaults to seed 0, so the episodes that choose ``best/`` are not
the ones that report its final figure, and neither shares an object pose with the recorded
demonstrations (see ilstudio/sim/envs.py). The random number generators are restored after
each evaluation: a run with evaluation trains exactly like one without.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

from absl import logging
from transformers import TrainerCallback

from ilstudio import rundir
from ilstudio.config.settings import SimSettings
from ilstudio.training import curve

SELECTION_SEED = 1
SIM_PACKAGES = ("mujoco", "dm_control", "gym_aloha")


def why_no_rollouts(task_name: str, sim: SimSettings | None, camera_names: Sequence[str],
                    args) -> str | None:
    """Why this run cannot be evaluated in the simulator (None when it can). ``sim``: the
    run's SimSettings, None when its task binds no sim.* (``resolve.build_settings``)."""
    if sim is None:
        return (f"task {task_name} has no simulator (its gin file binds no sim.*; "
                f"the simulated tasks are sim_transfer_cube_scripted and sim_insertion_scripted)")
    missing = [p for p in SIM_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        return f"the simulator is not installed ({', '.join(missing)} missing: pip install -e '.[sim]')"
    if not camera_names:
        return "task.camera_names is empty: the simulator needs a camera to render"
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        return "the weights are sharded across processes (DeepSpeed/FSDP); only the main process rolls out"
    return None


@contextlib.contextmanager
def rng_preserved():
    """Restore torch's, numpy's and Python's global generators after the block."""
    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def score(record: dict) -> tuple[float, float]:
    """What "best" means: success rate first, mean return to break a tie."""
    return (float(record.get(curve.SUCCESS_KEY, 0.0)), float(record.get(curve.RETURN_KEY, 0.0)))


class SimEvalCallback(TrainerCallback):
    """Rolls the policy out every ``every`` steps; keeps best/ and learning_curve.png.

    rollouts=False (no simulator for this task): only the curve is drawn.
    """

    def __init__(self, trainer, resolved, stats, *, every: int, episodes: int, rollouts: bool,
                 tensorboard_dir: str | None = None, seed: int = SELECTION_SEED) -> None:
        self.trainer = trainer
        self.run_dir = Path(resolved.output_dir)
        self.task, self.sim, self.dataset = resolved.task, resolved.sim, resolved.dataset
        self.chunk_size = resolved.model.chunk_size
        self.use_images = resolved.use_images
        # The policy's declared evaluation mode (<policy>.temporal_ensemble / .query_every),
        # the same one ``python -m ilstudio.eval`` defaults to.
        self.temporal_ensemble = resolved.policy.temporal_ensemble
        self.query_every = resolved.policy.query_every or None
        self.title = f"{resolved.task_name}: {resolved.model.policy} ({self.run_dir.name})"
        self.stats, self.every, self.episodes, self.seed = stats, every, episodes, seed
        self.rollouts, self.tensorboard_dir = rollouts, tensorboard_dir
        self.best: tuple[float, float] | None = None
        self.last_evaluated = -1
        self._writer = None

    # -- events ---------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.rollouts:
            return
        record = self.run_dir / rundir.BEST_DIR / rundir.BEST_RECORD
        if record.is_file():  # resumed: the bar is what best/ scored, whichever step wrote it
            self.best = score(json.loads(record.read_text()))
        evaluated = [r for r in state.log_history if curve.SUCCESS_KEY in r]
        if evaluated:
            self.best = max([self.best or score(evaluated[0]), *map(score, evaluated)])
            self.last_evaluated = int(evaluated[-1]["step"])

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step % self.every == 0:
            # Our log call clears should_log (CallbackHandler.on_log does): keep the loss
            # record the Trainer is about to write for this step.
            should_log = control.should_log
            self.evaluate(state)
            control.should_log = should_log
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.last_evaluated != state.global_step:
            self.evaluate(state)
        else:  # drawn at on_step_end, before the Trainer logged this step's loss: redraw
            self.draw(state)
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- work -----------------------------------------------------------------------------

    def evaluate(self, state) -> dict | None:
        """Roll out, log, keep best/ and redraw the curve; returns the logged metrics."""
        self.last_evaluated = state.global_step
        if not self.rollouts:
            self.draw(state)
            return None
        t0 = time.perf_counter()
        results = self.roll_out()
        from ilstudio.sim.rollout import summarize

        summary = summarize(results, time.perf_counter() - t0)
        metrics = {curve.SUCCESS_KEY: summary["success_rate"],
                   curve.RETURN_KEY: summary["mean_return"],
                   "eval_sim_seconds": round(summary["seconds"], 2)}
        self.trainer.log(dict(metrics))  # log history, TensorBoard, console
        logging.info("step %d: success %d/%d in the simulator (mean return %.1f, %.1f s)",
                     state.global_step, summary["successes"], summary["num_episodes"],
                     summary["mean_return"], summary["seconds"])
        videos = [r.frames for r in results if r.frames]
        if videos and self.tensorboard_dir:
            self.log_video(videos[0], state.global_step)
        if self.best is None or score(metrics) > self.best:
            self.best = score(metrics)
            self.save_best(state.global_step, {**metrics, "num_episodes": summary["num_episodes"],
                                               "successes": summary["successes"],
                                               "success_rate_ci95": summary["success_rate_ci95"],
                                               "seed": self.seed})
        self.draw(state)
        return metrics

    def roll_out(self) -> list:
        from ilstudio.sim.rollout import policy_agent, run_episodes

        model = self.trainer.model
        device = next(model.parameters()).device
        agent = policy_agent(model, self.stats, self.task, self.dataset, self.chunk_size,
                             device=device, use_images=self.use_images,
                             query_every=self.query_every, temporal_ensemble=self.temporal_ensemble)
        ema = getattr(self.trainer, "ema", None)
        was_training = model.training
        with rng_preserved(), (ema.applied(model) if ema is not None else contextlib.nullcontext()):
            model.eval()
            try:
                return run_episodes(agent, self.task, self.sim, self.episodes, self.seed,
                                    video_episodes=1 if self.tensorboard_dir else 0)
            finally:
                model.train(was_training)

    def save_best(self, step: int, record: dict) -> None:
        """best/: the checkpoint's weights exactly as a checkpoint saves them (EMA, LoRA)."""
        best = self.run_dir / rundir.BEST_DIR
        with rundir.output_errors(self.run_dir, rundir.BEST_DIR), rundir.atomic_dir(best) as staged:
            self.trainer.save_model(str(staged))
            (staged / rundir.BEST_RECORD).write_text(json.dumps({"step": step, **record}, indent=1) + "\n")
        logging.info("step %d: new best (success rate %.0f%%) saved in %s", step,
                     100 * record[curve.SUCCESS_KEY], best)

    def draw(self, state) -> None:
        if curve.write(self.run_dir, state.log_history, self.title) is None:
            logging.warning("matplotlib is not installed: no %s (pip install matplotlib)",
                            rundir.LEARNING_CURVE)

    def log_video(self, frames: list, step: int) -> None:
        """The episode as an animated GIF in TensorBoard's Images tab (no moviepy needed)."""
        import io

        import imageio.v2 as imageio
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter

        # At most ~100 frames of at most 160 px wide: a few MB per evaluation in the event
        # file rather than tens (rollouts record every 2nd step of a 400-step episode).
        stride = max(1, len(frames) // 100)
        shrink = max(1, frames[0].shape[1] // 160)
        frames = [f[::shrink, ::shrink] for f in frames[::stride]]
        buf = io.BytesIO()
        imageio.mimsave(buf, frames, format="GIF", duration=40 * stride, loop=0)
        h, w = frames[0].shape[:2]
        image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue())
        if self._writer is None:
            self._writer = SummaryWriter(self.tensorboard_dir)
        self._writer._get_file_writer().add_summary(  # noqa: SLF001 - add_video needs moviepy
            Summary(value=[Summary.Value(tag="eval/sim_video", image=image)]), step)
        self._writer.flush()
