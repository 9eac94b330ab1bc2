"""The plan stage (ilstudio/plan.py) computes each pre-run fact once.

A real train.py run (one step on tiny synthetic data) through a small counting hook: every
episode is checked (``EpisodeRef.check``: opens the file, reads its header) exactly once
before training starts, and the resume target is resolved once, on a fresh run and on the
resume of it. The hook counts calls and passes them through; nothing is mocked.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, tiny_args, train_env

COUNTING_RUN = r"""
import collections, json, sys
import ilstudio.plan as plan
import ilstudio.training.run as run
from ilstudio.data.episodes import HDF5Episode

counts = {"check": collections.Counter(), "resume_checkpoint": 0, "at_first_step": None}
check, resume, probe = HDF5Episode.check, plan.resume_checkpoint, run.probe_first_step

def counted_check(self, *a, **k):
    counts["check"][self.name] += 1
    return check(self, *a, **k)

def counted_resume(*a, **k):
    counts["resume_checkpoint"] += 1
    return resume(*a, **k)

def snapshot(*a, **k):  # the last thing before the lock and the first step
    counts["at_first_step"] = dict(counts["check"])
    return probe(*a, **k)

HDF5Episode.check, plan.resume_checkpoint, run.probe_first_step = (
    counted_check, counted_resume, snapshot)
sys.argv = ["train.py", *sys.argv[1:]]
from ilstudio.main import run_cli
try:
    run_cli()
finally:
    print("COUNTS " + json.dumps(counts), file=sys.stderr)
"""


def _counted_run(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", COUNTING_RUN, *args], cwd=REPO, env=train_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stderr.splitlines() if x.startswith("COUNTS "))
    return json.loads(line.removeprefix("COUNTS "))


def test_each_episode_is_checked_once_and_the_resume_target_resolved_once(tiny_data, tmp_path):
    out = tmp_path / "run"
    episodes = {p.name: 1 for p in tiny_data.glob("*.hdf5")}
    args = tiny_args(tiny_data, out, "--save_strategy=steps", "--save_steps=1",
                     "--resume_from_checkpoint=true")
    fresh = _counted_run(*args, "--max_steps=1")
    assert fresh["at_first_step"] == episodes and fresh["check"] == episodes
    assert fresh["resume_checkpoint"] == 1
    assert (out / "checkpoint-1").is_dir()

    resumed = _counted_run(*args, "--max_steps=2")  # continues checkpoint-1
    assert resumed["at_first_step"] == episodes and resumed["check"] == episodes
    assert resumed["resume_checkpoint"] == 1
    assert (out / "checkpoint-2").is_dir()


def test_the_plan_says_fresh_or_refused_and_why(tiny_data, tmp_path):
    """The verdict, the resume and the data in a few lines (what --dry_run prints); a
    directory holding another run is a refused verdict (printed by --explain), and
    make_plan raises its message."""
    import pytest

    from ilstudio.errors import UserError
    from ilstudio.plan import make_plan, plan_output
    from ilstudio.resolve import resolve_argv

    out = tmp_path / "run"
    resolved = resolve_argv(tiny_args(tiny_data, out))
    plan = make_plan(resolved)
    assert plan.verdict.kind == "fresh" and plan.resume_from is None
    assert plan.data.lengths == (50, 50, 50, 50) and len(plan.data.fingerprint()["episodes"]) == 4
    assert plan.describe().splitlines() == [
        f"# output_dir: fresh run in {out}", "# resume: --resume_from_checkpoint=false",
        f"# data: 4 episodes, 200 steps in {tiny_data}"]
    out.mkdir()
    (out / "operative_config.gin").write_text("# the dumps of another run\n")
    verdict = plan_output(resolved.hyper, overwrite=False)
    assert verdict.kind == "refused" and "already holds a run" in verdict.refused
    with pytest.raises(UserError, match="already holds a run"):
        make_plan(resolved)
