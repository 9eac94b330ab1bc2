"""train.py with a tracer: run as ``torchrun ... tests/helpers_distributed.py <train.py flags>``.

Everything real runs (flags, gin, Trainer, DDP over gloo); the tracer only records, per
process, what the distributed tests need to see and train.py does not print:

* ``indices``: dataset indices this rank read, in order;
* ``batch_sizes``: the batch size of every training forward on this rank;
* ``writes``: files and directories under ``--output_dir`` this rank created or wrote
  (Python ``open``/``os.open`` for writing, mkdir, rename, ``torch.save`` and safetensors'
  ``save_file``, whose native writers bypass Python's audit hooks);
* ``config_sha``: hash of the configuration this rank resolved (what ``agree`` compared).

``ILS_RANK1_EXTRA_FLAG``, if set, is appended to rank 1's command line only: a node whose
files or flags differ, which must stop the run.

It writes ``$ILS_TRACE_DIR/rank<RANK>.json`` at exit.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRACE: dict = {"indices": [], "batch_sizes": [], "writes": [], "config_sha": None}


def _output_dir(argv: list[str]) -> str:
    for a in argv:
        if a.startswith("--output_dir="):
            return os.path.realpath(a.split("=", 1)[1])
    raise SystemExit("helpers_distributed: pass --output_dir=")


def _install(out: str) -> None:
    def note(path) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            p = os.path.realpath(os.fsdecode(path))
            if p == out or p.startswith(out + os.sep):
                TRACE["writes"].append(os.path.relpath(p, out))

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing:
                note(path)
        elif event in ("os.mkdir", "os.rename", "shutil.rmtree", "os.remove"):
            note(args[1] if event == "os.rename" else args[0])

    sys.addaudithook(hook)

    import safetensors.torch  # Rust writes bypass the audit hook: wrap before transformers binds it

    real_save_file = safetensors.torch.save_file

    def save_file(tensors, filename, *a, **k):
        note(filename)
        return real_save_file(tensors, filename, *a, **k)

    safetensors.torch.save_file = save_file

    import torch  # torch.save(path) writes through its C++ file writer: wrap it too

    real_torch_save = torch.save

    def torch_save(obj, f, *a, **k):
        note(f)
        return real_torch_save(obj, f, *a, **k)

    torch.save = torch_save

    from ilstudio.data.dataset import EpisodeDataset
    from ilstudio.policies.mlp.modeling import MLPPolicy
    from ilstudio.training import distributed

    real_getitem, real_forward, real_agree = (EpisodeDataset.__getitem__, MLPPolicy.forward,
                                              distributed.agree)

    from ilstudio.training import run

    real_probe = run.probe_first_step
    probing = []

    def getitem(self, i):
        if not probing:  # the probe before the first write reads a batch too: not training's
            TRACE["indices"].append(int(i))
        return real_getitem(self, i)

    def probe(*a, **k):
        probing.append(True)
        try:
            return real_probe(*a, **k)
        finally:
            probing.clear()

    run.probe_first_step = probe

    def forward(self, qpos, action=None, *a, **k):
        if action is not None and self.training:
            TRACE["batch_sizes"].append(int(qpos.shape[0]))
        return real_forward(self, qpos, action, *a, **k)

    def agree(config, error):
        TRACE["config_sha"] = hashlib.sha256(config.encode()).hexdigest()
        return real_agree(config, error)

    EpisodeDataset.__getitem__, MLPPolicy.forward, distributed.agree = getitem, forward, agree


def _dump() -> None:
    trace_dir = Path(os.environ["ILS_TRACE_DIR"])
    trace_dir.mkdir(parents=True, exist_ok=True)
    TRACE.update(rank=int(os.environ.get("RANK", "0")),
                 world_size=int(os.environ.get("WORLD_SIZE", "1")))
    (trace_dir / f"rank{TRACE['rank']}.json").write_text(json.dumps(TRACE))


def agree_worker(rank: int, port: int, scenarios: list, results) -> None:
    """A spawned gloo rank that runs ``agree`` on each (configs, errors) scenario in turn."""
    import torch.distributed as dist

    from ilstudio.errors import UserError
    from ilstudio.training.distributed import agree

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for i, (configs, errors) in enumerate(scenarios):
            try:
                agree(configs[rank], errors[rank])
                results.put((i, rank, None))
            except UserError as e:
                results.put((i, rank, str(e)))
    finally:
        dist.destroy_process_group()


def main() -> None:
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    extra = os.environ.get("ILS_RANK1_EXTRA_FLAG")
    if extra and os.environ.get("RANK") == "1":
        sys.argv.append(extra)
    _install(_output_dir(sys.argv[1:]))
    atexit.register(_dump)
    from absl import flags

    from ilstudio.config import hyperparams
    from ilstudio.main import run_cli

    flags.adopt_module_key_flags(hyperparams)
    sys.argv[0] = str(REPO / "train.py")
    run_cli()


if __name__ == "__main__":
    main()
