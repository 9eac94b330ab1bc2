"""Rolling agents out in the joint-space ALOHA scene and scoring them.

Every agent, learned or scripted, goes through the same loop: the same seeded object poses
(evaluation seeds, disjoint from recording ones), the same horizon (``task.episode_len``),
the same renderer settings as the training data, and the same success test: the task's
maximal reward (4) at the final step. A scripted agent that reaches ~100% here is the proof
that the loop measures what it says; a still agent (``HoldAgent``) is the floor (0%).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ilstudio.policies.ensemble import TemporalEnsembler
from ilstudio.sim.envs import (
    EVAL,
    Renderer,
    episode_seed,
    make_joint_env,
    max_reward,
    object_pose,
    reset_joint_env,
)


class Agent:
    """Maps (step, qpos, frames) to a 14-dim joint action; ``reset`` starts an episode."""

    uses_images = False

    def reset(self, pose: np.ndarray) -> None:  # noqa: B027 - optional hook
        pass

    def wants_frames(self, t: int) -> bool:
        """Whether ``act(t, ...)`` reads camera frames (the loop renders only then)."""
        return self.uses_images

    def act(self, t: int, qpos: np.ndarray, frames: dict[str, np.ndarray] | None) -> np.ndarray:
        raise NotImplementedError


class ScriptedAgent(Agent):
    """The recording's scripted policy, replayed open-loop in the joint-space scene."""

    def __init__(self, settings, episode_len: int) -> None:
        from ilstudio.sim.scripted import ScriptedPlanner

        self.planner = ScriptedPlanner(settings)
        self.episode_len = episode_len
        self.actions = np.zeros((0, 14))

    def reset(self, pose: np.ndarray) -> None:
        self.actions = self.planner.plan(pose, self.episode_len).joint_actions

    def act(self, t, qpos, frames):
        return self.actions[t]


class HoldAgent(Agent):
    """Holds the first observed joint position: never succeeds (the evaluator's floor)."""

    def reset(self, pose):
        self.start = None

    def act(self, t, qpos, frames):
        if self.start is None:
            self.start = np.array(qpos, dtype=np.float64)
        return self.start


class PolicyAgent(Agent):
    """A trained policy: normalized qpos (+ frames fitted like the training data) -> chunk.

    Executes each predicted chunk for ``query_every`` steps, or, with temporal ensembling,
    queries every step and blends the overlapping chunks (ACT).
    """

    def __init__(self, policy, stats, *, cameras: tuple[str, ...], use_images: bool,
                 image_size, image_aspect_ratio: str, history: int, query_every: int,
                 temporal_ensemble: bool) -> None:
        self.policy, self.stats = policy, stats
        self.cameras = cameras
        self.uses_images = use_images
        self.image_size, self.aspect, self.history = image_size, image_aspect_ratio, history
        self.query_every = 1 if temporal_ensemble else query_every
        self.te = TemporalEnsembler() if temporal_ensemble else None
        self.chunk: np.ndarray | None = None
        self.chunk_start = 0
        self.frames: dict[str, collections.deque] = {}

    def reset(self, pose):
        self.chunk, self.chunk_start = None, 0
        self.frames = {c: collections.deque(maxlen=self.history) for c in self.cameras}
        if self.te is not None:
            self.te.reset()

    def _images(self, frames: dict[str, np.ndarray]):
        import torch

        from ilstudio.data.image_ops import fit_frames

        per_cam = []
        for cam in self.cameras:
            hist = self.frames[cam]
            hist.append(fit_frames(frames[cam][None], self.image_size, self.aspect)[0])
            while len(hist) < self.history:  # episode start: repeat the first frame (as training)
                hist.appendleft(hist[0])
            per_cam.append(np.stack(hist))
        x = torch.from_numpy(np.stack(per_cam)).permute(0, 1, 4, 2, 3).float().div_(255.0)
        x = x[:, 0] if self.history == 1 else x
        return x.unsqueeze(0)  # (1, cams, [history,] 3, H, W)

    def _query(self, qpos: np.ndarray, frames) -> np.ndarray:
        import torch

        q = torch.from_numpy(self.stats.normalize_qpos(np.asarray(qpos, dtype=np.float32))).unsqueeze(0)
        images = self._images(frames) if self.uses_images else None
        with torch.no_grad():
            out = self.policy.select_action(q, images) if images is not None else self.policy.select_action(q)
        return self.stats.unnormalize_action(out[0].float().cpu().numpy().astype(np.float64))

    def _due(self, t: int) -> bool:
        """A new chunk is predicted at step t (every step with ensembling)."""
        return (self.te is not None or self.chunk is None
                or t - self.chunk_start >= min(self.query_every, len(self.chunk)))

    def wants_frames(self, t: int) -> bool:
        # Frames are read only when the policy is queried: chunked execution renders one
        # frame per chunk, not one per step (the frame history is also kept per query).
        return self.uses_images and self._due(t)

    def act(self, t, qpos, frames):
        if self.te is not None:
            self.te.add(t, self._query(qpos, frames))
            return self.te.action(t)
        if self._due(t):
            self.chunk, self.chunk_start = self._query(qpos, frames), t
        return self.chunk[t - self.chunk_start]


class OnDevice:
    """Moves select_action's inputs to the policy's device."""

    def __init__(self, policy, device) -> None:
        self.policy, self.device = policy, device

    def select_action(self, qpos, images=None):
        qpos = qpos.to(self.device)
        if images is None:
            return self.policy.select_action(qpos)
        return self.policy.select_action(qpos, images.to(self.device))


def policy_agent(policy, stats, task, dataset, chunk_size: int, *, device, use_images: bool,
                 query_every: int | None = None, temporal_ensemble: bool = False) -> PolicyAgent:
    """The agent that rolls a trained policy out, fed exactly like its training data.

    One construction for ``python -m ilstudio.eval`` and the in-training evaluation
    (ilstudio/training/sim_eval.py), so both measure the same thing. query_every: steps each
    chunk runs (default: the whole chunk); ignored with temporal ensembling (every step).
    """
    from ilstudio.errors import UserError

    query_every = query_every or chunk_size
    if not 1 <= query_every <= chunk_size:
        raise UserError(f"--query_every={query_every}: must be between 1 and the chunk size {chunk_size}")
    return PolicyAgent(
        OnDevice(policy, device), stats, cameras=tuple(task.camera_names), use_images=use_images,
        image_size=dataset.image_size, image_aspect_ratio=dataset.image_aspect_ratio,
        history=dataset.history_images_length, query_every=query_every,
        temporal_ensemble=temporal_ensemble)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sensible at 0% and 100%)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, center - half)  # exact bounds at 0% and 100%
    hi = 1.0 if successes == n else min(1.0, center + half)
    return (lo, hi)


@dataclass
class EpisodeResult:
    index: int
    seed: int
    success: bool
    final_reward: float
    max_reward: float
    episode_return: float
    steps: int
    first_max_reward_step: int | None
    frames: list[np.ndarray] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "frames"}


_WORKER: dict = {}  # this process's rollout state: its agent, runner and seed in a worker


class EpisodeRunner:
    """One joint-space scene and its renderer, reused for every episode a process runs."""

    def __init__(self, task, sim) -> None:
        self.task, self.sim = task, sim
        _WORKER["rendered"] = True  # this process now holds a GL context (see run_episodes_parallel)
        self.env = make_joint_env(sim)
        self.renderer = Renderer(self.env.physics, task.camera_names, sim)
        self.goal = max_reward(self.env)

    def run(self, agent: Agent, seed: int, index: int, *, film: bool = False,
            video_every: int = 2) -> EpisodeResult:
        """Episode ``index`` of evaluation seed ``seed`` (film: keep every ``video_every``-th
        frame of the first camera). Frames are rendered only at the steps the agent reads
        them, or films them."""
        ep_seed = episode_seed(EVAL, seed, index)
        pose = object_pose(self.sim.task, ep_seed)
        agent.reset(pose)
        ts = reset_joint_env(self.env, pose)
        top = self.task.camera_names[0]
        rewards: list[float] = []
        video: list[np.ndarray] = []
        for t in range(self.task.episode_len):
            want_video = film and t % video_every == 0
            frames = self.renderer.render() if want_video or agent.wants_frames(t) else None
            if want_video:
                video.append(frames[top])
            ts = self.env.step(agent.act(t, ts.observation["qpos"], frames))
            rewards.append(float(ts.reward or 0.0))
        hits = [t for t, r in enumerate(rewards) if r == self.goal]
        return EpisodeResult(index=index, seed=ep_seed, success=rewards[-1] == self.goal,
                             final_reward=rewards[-1], max_reward=max(rewards),
                             episode_return=float(sum(rewards)), steps=len(rewards),
                             first_max_reward_step=(hits[0] + 1) if hits else None, frames=video)


def run_episodes(agent: Agent, task, sim, num_episodes: int, seed: int, *,
                 video_episodes: int = 0, video_every: int = 2,
                 on_episode: Callable[[EpisodeResult], None] | None = None,
                 episodes: Sequence[int] | None = None) -> list[EpisodeResult]:
    """Roll ``agent`` out for episodes 0..num_episodes-1 of evaluation seed ``seed``.

    episodes: run these episode indices instead (each is the same episode whenever it runs:
    the pose comes from (seed, index) and physics and policy are deterministic), e.g. to film
    one again. The first ``video_episodes`` of those run keep their frames.
    """
    runner = EpisodeRunner(task, sim)
    results = []
    indices = list(range(num_episodes)) if episodes is None else list(episodes)
    for n, i in enumerate(indices):
        res = runner.run(agent, seed, i, film=n < video_episodes, video_every=video_every)
        results.append(res)
        if on_episode is not None:
            on_episode(res)
    return results


def _worker_init(agent: Agent, task, sim, seed: int) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core; OpenMP pools do not survive fork
    _WORKER.update(agent=agent, task=task, sim=sim, seed=seed)


def _worker_episode(job: tuple[int, bool]) -> EpisodeResult:
    index, film = job
    if "runner" not in _WORKER:  # the GL context is created in the worker, after the fork
        _WORKER["runner"] = EpisodeRunner(_WORKER["task"], _WORKER["sim"])
    return _WORKER["runner"].run(_WORKER["agent"], _WORKER["seed"], index, film=film)


def run_episodes_parallel(agent: Agent, task, sim, num_episodes: int, seed: int, *,
                          workers: int = 1, video_episodes: int = 0,
                          on_episode: Callable[[EpisodeResult], None] | None = None
                          ) -> list[EpisodeResult]:
    """``run_episodes`` spread over ``workers`` forked processes, each with its own scene and
    a copy of the agent; every episode is the one ``run_episodes`` gives (same pose, same
    deterministic physics and policy), returned in episode order. workers=1: in-process.

    The workers are forked, so they must start before this process renders anything: a
    forked child cannot make its own GL context beside an inherited one (EGL hangs). A
    process that has rendered already runs the episodes itself.
    """
    if workers <= 1 or num_episodes <= 1 or _WORKER.get("rendered"):
        return run_episodes(agent, task, sim, num_episodes, seed, video_episodes=video_episodes,
                            on_episode=on_episode)
    import multiprocessing

    jobs = [(i, i < video_episodes) for i in range(num_episodes)]
    ctx = multiprocessing.get_context("fork")
    results = []
    with ctx.Pool(min(workers, num_episodes), initializer=_worker_init,
                  initargs=(agent, task, sim, seed)) as pool:
        for res in pool.imap_unordered(_worker_episode, jobs):
            results.append(res)
            if on_episode is not None:
                on_episode(res)
    return sorted(results, key=lambda r: r.index)


def summarize(results: list[EpisodeResult], seconds: float | None = None) -> dict:
    n = len(results)
    k = sum(r.success for r in results)
    lo, hi = wilson_interval(k, n)
    hits = [r.first_max_reward_step for r in results if r.success and r.first_max_reward_step]
    out = {
        "num_episodes": n,
        "successes": k,
        "success_rate": k / n if n else 0.0,
        "success_rate_ci95": [lo, hi],
        "ci_method": "Wilson score interval, 95%",
        "mean_return": float(np.mean([r.episode_return for r in results])) if n else 0.0,
        "mean_episode_length": float(np.mean([r.steps for r in results])) if n else 0.0,
        "mean_steps_to_success": float(np.mean(hits)) if hits else None,
        "mean_max_reward": float(np.mean([r.max_reward for r in results])) if n else 0.0,
        "episodes": [r.as_dict() for r in results],
    }
    if seconds is not None:
        out["seconds"] = seconds
        out["seconds_per_episode"] = seconds / max(1, n)
    return out


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
