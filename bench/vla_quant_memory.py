"""Memory and step time of the VLA language backbone: fp32 vs bf16 vs 8-bit vs 4-bit (nf4).

    OMP_NUM_THREADS=2 nice python bench/vla_quant_memory.py            # ~270M parameters
    python bench/vla_quant_memory.py --hidden 512 --layers 8 --vocab 8000   # a quick look

Builds a Llama-style causal LM from a config (random weights, saved once to a temporary
directory, as a pretrained checkpoint would be), then, for each mode in a fresh
subprocess (so peak RSS belongs to that mode alone):

- loads it the way the VLA policy does (``ilstudio.models.bnb_quantization_config`` /
  ``torch_dtype_for``): load time, ``model.get_memory_footprint()`` (parameters + buffers);
- wraps it in a small policy (LM + action head), applies LoRA to the attention projections
  with ``ilstudio.models.apply_lora`` (QLoRA for the bitsandbytes modes), and times
  forward + backward + AdamW step on a small batch (mean over the timed steps, after one
  warm-up step);
- reports peak RSS of the process (``resource.getrusage``), also the part above the
  process's RSS right after importing torch/transformers/peft/bitsandbytes; on CUDA, peak
  GPU memory allocated.

Prints the machine (CPU count, threads, torch/transformers/peft/bitsandbytes versions)
and a table. Figures on a shared machine vary by tens of percent between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("fp32", "bf16", "int8", "nf4")


def rss_mib() -> float:
    """Peak RSS of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return rss_mib()


def build_checkpoint(args, directory: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=max(256, args.seq),
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    return n


def measure(args, directory: str, mode: str) -> dict:
    """One mode, in this (fresh) process."""
    import bitsandbytes  # noqa: F401  (imported before the baseline so it is not counted)
    import peft  # noqa: F401
    import torch
    from torch import nn
    from transformers import LlamaForCausalLM

    from ilstudio.config.settings import LoraSettings, QuantizationSettings
    from ilstudio.models import apply_lora, bnb_quantization_config, lora_target_modules, torch_dtype_for

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    base_rss = current_rss_mib()
    quant = {"fp32": QuantizationSettings(),
             "bf16": QuantizationSettings(enable=True, bits=16),
             "int8": QuantizationSettings(enable=True, bits=8),
             "nf4": QuantizationSettings(enable=True, bits=4, quant_type="nf4", double_quant=True)}[mode]
    kwargs = {}
    qconfig = bnb_quantization_config(quant, compute_dtype=torch.bfloat16 if cuda else None)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    if torch_dtype_for(quant) is not None:
        kwargs["dtype"] = torch_dtype_for(quant)
    if cuda:
        kwargs["device_map"] = {"": device.index or 0}
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    llm = LlamaForCausalLM.from_pretrained(directory, **kwargs)
    load_s = time.perf_counter() - t0
    footprint = llm.get_memory_footprint()
    load_peak = rss_mib()

    class Policy(nn.Module):
        def __init__(self, llm: nn.Module) -> None:
            super().__init__()
            self.llm = llm
            self.action_head = nn.Linear(llm.config.hidden_size, 14 * 8)

        def forward(self, input_ids, target):
            # The action head reads the decoder's hidden states (no vocabulary logits).
            h = self.llm.get_decoder()(input_ids=input_ids).last_hidden_state[:, -1]
            return nn.functional.mse_loss(self.action_head(h.float()), target)

    policy = Policy(llm)
    policy.action_head.to(device)
    lora = LoraSettings(enable=True, module=r"q_proj,k_proj,v_proj,o_proj", r=args.lora_r,
                        alpha=2 * args.lora_r, dropout=0.05)
    targets = lora_target_modules({"llm": policy.llm, "action_head": policy.action_head}, lora.module,
                                  root=policy)
    policy = apply_lora(policy, lora, targets, quantized=qconfig is not None)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    target = torch.randn(args.batch, 14 * 8, generator=g).to(device)
    times, losses = [], []
    for step in range(args.steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = policy(ids, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step:  # the first step warms up (allocations, kernel choice)
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    out = {"mode": mode, "load_s": load_s, "footprint_mib": footprint / 2**20,
           "trainable_m": sum(p.numel() for p in trainable) / 1e6,
           "step_s": sum(times) / len(times), "peak_rss_mib": rss_mib(), "load_peak_rss_mib": load_peak,
           "base_rss_mib": base_rss, "loss_first": losses[0], "loss_last": losses[-1]}
    if cuda:
        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def machine(args) -> str:
    import bitsandbytes
    import peft
    import torch
    import transformers

    dev = args.device
    if dev.startswith("cuda"):
        dev = f"{dev} ({torch.cuda.get_device_name()})"
    return (f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} "
            f"torch_threads={torch.get_num_threads()} device={dev}\n"
            f"versions: python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, "
            f"bitsandbytes {bitsandbytes.__version__}")


def table(rows: list[dict], cuda: bool) -> str:
    head = ["mode", "load s", "param MiB", "peak RSS MiB", "RSS over imports", "step s",
            "trainable M (LoRA+head)", "loss first->last"]
    if cuda:
        head.insert(4, "GPU peak MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error']} |")
            continue
        cells = [r["mode"], f"{r['load_s']:.2f}", f"{r['footprint_mib']:.0f}", f"{r['peak_rss_mib']:.0f}",
                 f"{r['peak_rss_mib'] - r['base_rss_mib']:.0f}", f"{r['step_s']:.3f}",
                 f"{r['trainable_m']:.2f}", f"{r['loss_first']:.3f}->{r['loss_last']:.3f}"]
        if cuda:
            cells.insert(4, f"{r['gpu_peak_mib']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--_measure", nargs=2, metavar=("DIR", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._measure:
        print("RESULT " + json.dumps(measure(args, *args._measure)), flush=True)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    print(machine(args), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vla_quant_bench_") as tmp:
        n = build_checkpoint(args, Path(tmp))
        print(f"model: Llama-style causal LM, {n / 1e6:.0f}M parameters (hidden {args.hidden}, "
              f"{args.layers} layers, intermediate {args.intermediate}, vocab {args.vocab}); "
              f"LoRA r={args.lora_r} on q/k/v/o; batch {args.batch} x seq {args.seq}; "
              f"{args.steps} timed steps", flush=True)
        passthrough = [f"--{k}={getattr(args, k)}" for k in
                       ("hidden", "intermediate", "layers", "heads", "vocab", "batch", "seq", "steps",
                        "lora_r", "device")]
        for mode in modes:
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--_measure", tmp, mode],
                                  capture_output=True, text=True)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not found:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"mode": mode, "error": f"exit {proc.returncode}: {tail[:200]}"})
            else:
                rows.append(json.loads(found[-1][len("RESULT "):]))
            print(f"  {mode}: done", flush=True)
    print(table(rows, args.device.startswith("cuda")))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
