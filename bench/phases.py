"""Where evaluation episodes stop: counts by the highest reward each one reached, over one or
several evaluations of the same policy (e.g. 25 episodes of seed 0 and 25 of seed 1).

    python bench/phases.py [--task=insertion|transfer_cube] DIR [DIR ...]

Each DIR holds an eval_results.json (``python -m ilstudio.eval``, its --output_dir or the
checkpoint). Prints the pooled success count with its Wilson 95% interval and the stage counts.
The ALOHA tasks reward stages: insertion 1 = both grippers touch their object, 2 = both lifted
(neither touches the table), 3 = peg touches socket in the air, 4 = peg inside (touches the
pin); transfer cube 1 = right gripper touches the cube, 2 = lifted, 3 = both grippers touch it
(hand-over), 4 = held by the left gripper alone. Success is final-step reward 4, so "reached 4,
lost it" is counted apart.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from ilstudio.sim.rollout import wilson_interval

STAGES = {
    "insertion": ["no contact with both", "touched both", "lifted both", "peg touches socket",
                  "inserted"],
    "transfer_cube": ["no touch", "touched", "lifted", "hand-over contact", "transferred"],
}


def pooled(dirs: list[Path]) -> dict:
    eps = []
    for d in dirs:
        eps += json.loads((d / "eval_results.json").read_text())["episodes"]
    k = sum(bool(e["success"]) for e in eps)
    return {"episodes": len(eps), "successes": k, "ci95": wilson_interval(k, len(eps)),
            "reached": Counter(int(e["max_reward"]) for e in eps),
            "lost": sum(1 for e in eps if e["max_reward"] == 4 and not e["success"]),
            "failed_at": sorted(e["index"] for e in eps if not e["success"])}


def main(argv: list[str]) -> int:
    task = next((a.split("=", 1)[1] for a in argv if a.startswith("--task=")), "")
    dirs = [Path(a) for a in argv if not a.startswith("--task=")]
    for d in [] if task else dirs:
        for cand in (d, d.parent, d.parent.parent):
            op = cand / "operative_config.gin"
            if op.is_file():
                task = "insertion" if "sim.task = 'insertion'" in op.read_text() else "transfer_cube"
                break
    task = task or "transfer_cube"
    p = pooled(dirs)
    lo, hi = p["ci95"]
    print(f"{' + '.join(map(str, dirs))}: {p['successes']}/{p['episodes']} = "
          f"{p['successes'] / max(1, p['episodes']):.0%} (Wilson 95% {lo:.0%}-{hi:.0%}; {task})")
    for r in range(5):
        print(f"  highest reward {r} ({STAGES[task][r]}): {p['reached'].get(r, 0)}")
    print(f"  reached 4 but not at the last step: {p['lost']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
