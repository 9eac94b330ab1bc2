"""How many threads torch uses for one training process on a CPU.

torch's default counts the machine's cores, not the ones this process may run on (a
container, ``taskset``, a batch scheduler's cgroup), and ignores the DataLoader workers and
the other ranks of a local torchrun. Each surplus thread costs dearly on a busy CPU: on a
2-core machine 2 threads ran small ops 20-100x slower than 1 when anything else ran (see
../shared/STACK-FACTS.md). ``OMP_NUM_THREADS``, when set, is the user's choice and wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; the CPU count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def thread_count(environ: Mapping[str, str], cpus: int, dataloader_workers: int) -> tuple[int, str]:
    """(intra-op threads for the training process, why), without oversubscribing.

    OMP_NUM_THREADS when set to a positive integer; else this process's share of ``cpus``
    among the local processes (LOCAL_WORLD_SIZE, set by torchrun/accelerate), less one per
    DataLoader worker (each worker runs its own single-threaded torch), at least 1.
    """
    given = environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given), "OMP_NUM_THREADS"
    local = environ.get("LOCAL_WORLD_SIZE", "1").strip()
    procs = int(local) if local.isdigit() and int(local) > 0 else 1
    n = max(1, cpus // procs - max(0, dataloader_workers))
    why = f"{cpus} usable CPUs"
    if procs > 1:
        why += f" / {procs} local processes"
    if dataloader_workers > 0:
        why += f" - {dataloader_workers} DataLoader workers"
    return n, why


def workers_cost(dataloader_workers: int, cpus: int) -> str | None:
    """What more DataLoader workers than usable CPUs cost, said once (None when they fit).

    torch warns about the same thing twice per run (when the Trainer builds the DataLoader
    and again when it starts iterating), in words that suggest something is broken. The
    run works; the workers only share the CPUs with training.
    """
    if dataloader_workers <= cpus:
        return None
    return (f"--dataloader_num_workers={dataloader_workers} on {cpus} usable CPUs: the "
            f"{dataloader_workers} worker processes share them with training (torch suggests "
            f"at most {cpus}), so each batch costs more CPU time, not less. It works; "
            f"--dataloader_num_workers={max(0, cpus - 1)} suits this machine.")


def configure(dataloader_workers: int) -> tuple[int, str]:
    """Set torch's intra-op thread count for this process; returns (count, why). Says once
    what surplus DataLoader workers cost (``workers_cost``), in place of torch's two warnings."""
    import warnings

    import torch
    from absl import logging

    cost = workers_cost(dataloader_workers, usable_cpus())
    if cost is not None:
        if os.environ.get("RANK", "0") in ("", "0"):  # one rank says it for all
            logging.warning(cost)
        warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes",
                                category=UserWarning)
    n, why = thread_count(os.environ, usable_cpus(), dataloader_workers)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads(), why
