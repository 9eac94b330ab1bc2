"""Memory and step time of a Qwen2-VL-shaped VLA backbone: fp32 vs bf16 vs 8-bit vs 4-bit (nf4).

    OMP_NUM_THREADS=1 nice python bench/vla_quant_memory.py        # ~0.52 B parameters, ~2 GiB fp32
    python bench/vla_quant_memory.py --text_layers 4 --vocab 20000  # a quick look

Builds a Qwen2-VL model from its config with random weights (Qwen2-0.5B-sized language
model: hidden 896, 24 layers, 14 heads / 2 KV heads, vocab 151,936, tied embeddings; a
4-block vision tower of width 640 whose merger feeds the LM), in a subprocess, and saves it
once to a temporary directory as safetensors, as a downloaded checkpoint would be. Then, for
each mode in its own fresh subprocess (so peak RSS belongs to that mode alone; one at a time):

- loads it the way a VLA run loads a backbone, ``ilstudio.policies.vla.backbones.load_backbone``
  with ``model.is_pretrained = True`` (4/8-bit bitsandbytes on the language model only: the
  vision tower, merger, embedding and lm head stay unquantized, in bf16; bits=16 loads all in
  bf16; these three read the file with pread, not a memory map, ``from_pretrained_unmapped``):
  load time, peak RSS right after the load, ``get_memory_footprint()`` (parameters + buffers);
- puts an action head on the language model's last hidden states (a small policy), applies
  LoRA r=16 to every Linear layer of the language model with ``ilstudio.models.apply_lora``
  (QLoRA, with ``prepare_kbit_training``, for the bitsandbytes modes), and times
  forward + backward + AdamW on a batch with one 56x56 image per sample (4 image tokens) and
  text (mean over the timed steps, after one warm-up step);
- reports the process's peak RSS (``resource.getrusage``) over load and steps, and the part
  above the RSS right after importing torch/transformers/peft/bitsandbytes.

The fp32 load maps the safetensors file and reads pages lazily, so its load-only RSS is small;
they become resident when the steps read them: compare the whole-process peaks. The 4/8-bit
loads leave the token embedding (tied lm head) in the file the same way
(``ilstudio.models.mapped_embeddings``). On the CPU the modes that quantize (bf16, int8, nf4)
apply the allocator policy a quantized CPU training run applies
(``ilstudio.training.allocator.configure``: glibc's mmap and trim thresholds fixed at 128 KiB,
unless ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` are set, which every child
inherits); fp32 keeps glibc's defaults, as a run that does not quantize does, or applies it
too with ``--allocator all`` (the same allocator in every mode). The table is followed by what
each mode ran with.
Without it glibc keeps the freed 4-bit dequantization buffers and a quantized process grows by
hundreds of MiB per step. Prints the machine (CPU count, threads, load average, versions) and a
table. On a shared machine step times vary several-fold with the load; memory figures are
stable.
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
IMAGE = 4  # grid of 14-pixel patches per side: a 56x56 image, 4 tokens after the 2x2 merge


def rss_mib() -> float:
    """Peak RSS of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return rss_mib()


def qwen2_vl_config(args):
    from transformers import Qwen2VLConfig

    text = dict(vocab_size=args.vocab, hidden_size=args.text_hidden,
                intermediate_size=args.text_intermediate, num_hidden_layers=args.text_layers,
                num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                max_position_embeddings=4096, tie_word_embeddings=True,
                bos_token_id=None, eos_token_id=None)
    vision = dict(depth=args.vision_depth, embed_dim=args.vision_dim, num_heads=args.vision_dim // 64,
                  hidden_size=args.text_hidden, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                        image_token_id=args.vocab - 1, vision_start_token_id=args.vocab - 2,
                        vision_end_token_id=args.vocab - 3, video_token_id=args.vocab - 4)
    return cfg


def fit_mrope(directory: str, args) -> None:
    """Qwen2VLConfig keeps Qwen2-VL-7B's multimodal RoPE sections whatever it is given; they must
    sum to head_dim / 2, so the saved config.json gets this head_dim's (weights do not depend
    on them)."""
    quarter = args.text_hidden // args.heads // 16  # sections 2:3:3 of head_dim / 2
    path = Path(directory) / "config.json"
    cfg = json.loads(path.read_text())
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [2 * quarter, 3 * quarter, 3 * quarter]
    path.write_text(json.dumps(cfg, indent=2))


def build_checkpoint(args, directory: str) -> dict:
    """Random weights from the config, saved as safetensors (run in its own process)."""
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(qwen2_vl_config(args))
    lm = model.model.language_model
    out = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "lm_params_m": sum(p.numel() for p in lm.parameters()) / 1e6}
    model.save_pretrained(directory)
    fit_mrope(directory, args)
    out["file_mib"] = sum(f.stat().st_size for f in Path(directory).glob("*.safetensors")) / 2**20
    return out


def inputs(args, cfg, device):
    """A batch: per sample one 56x56 image (Qwen2-VL's flattened patches) and text tokens."""
    import torch

    vc = cfg.vision_config
    g = torch.Generator().manual_seed(0)
    n_img = IMAGE * IMAGE // vc.spatial_merge_size ** 2
    ids = torch.randint(0, args.vocab - 8, (args.batch, args.seq), generator=g)
    ids[:, 1:1 + n_img] = cfg.image_token_id
    pixels = torch.randn(args.batch * IMAGE * IMAGE, 3 * vc.temporal_patch_size * vc.patch_size ** 2,
                         generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
             "image_grid_thw": torch.tensor([[1, IMAGE, IMAGE]] * args.batch),
             "mm_token_type_ids": (ids == cfg.image_token_id).long()}
    target = torch.randn(args.batch, 14 * 8, generator=g)
    return {k: v.to(device) for k, v in batch.items()}, target.to(device)


def load(directory: str, mode: str):
    """The backbone as a VLA run loads it: ``ilstudio.policies.vla.backbones.load_backbone``
    (pretrained weights; 4/8-bit on the language model only, the rest in bf16; bf16 for bits=16)."""
    from ilstudio.config.settings import ModelSettings, QuantizationSettings
    from ilstudio.policies.vla.backbones import load_backbone

    quant = {"fp32": QuantizationSettings(),
             "bf16": QuantizationSettings(enable=True, bits=16),
             "int8": QuantizationSettings(enable=True, bits=8),
             "nf4": QuantizationSettings(enable=True, bits=4, quant_type="nf4", double_quant=True)}[mode]
    model = ModelSettings(policy="vla", model_name_or_path=directory, is_pretrained=True)
    return load_backbone(model, quant)


def measure(args, directory: str, mode: str) -> dict:
    """One mode, in this (fresh) process."""
    import bitsandbytes  # noqa: F401  (imported before the baseline so it is not counted)
    import peft  # noqa: F401
    import torch
    from torch import nn

    from ilstudio.config.settings import LoraSettings
    from ilstudio.models import apply_lora, lora_target_modules

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    allocator = "glibc defaults" if not cuda else "-"
    if not cuda and (mode != "fp32" or args.allocator == "all"):
        # what train.py does in a CPU run that quantizes (ilstudio.training.run.train)
        from ilstudio.training import allocator as policy

        allocator = policy.configure()
    base_rss = current_rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    backbone = load(directory, mode)
    vlm, quantized = backbone.vlm.to(device), backbone.quantized
    load_s = time.perf_counter() - t0
    footprint, load_peak = vlm.get_memory_footprint(), rss_mib()

    class Policy(nn.Module):
        """The VLM's language-model hidden states at the last 8 positions -> an action chunk."""

        def __init__(self, vlm: nn.Module) -> None:
            super().__init__()
            self.vlm = vlm
            self.action_head = nn.Linear(vlm.config.text_config.hidden_size, 14)

        def forward(self, batch, target):
            h = self.vlm.model(**batch).last_hidden_state[:, -8:]
            return nn.functional.l1_loss(self.action_head(h.float()).flatten(1), target)

    policy = Policy(vlm)
    policy.action_head.to(device)
    lora = LoraSettings(enable=True, module="llm", r=args.lora_r, alpha=2 * args.lora_r, dropout=0.05)
    part = {k: vlm.get_submodule(v[0]) for k, v in backbone.parts.items() if k in ("llm", "vit") and v}
    parts = {**part, "action_head": policy.action_head}
    targets = lora_target_modules(parts, lora.module, root=policy)
    part["vit"].requires_grad_(False)  # as model.freeze_vision_tower; apply_lora freezes the LM
    policy = apply_lora(policy, lora, targets, quantized=quantized, parts=parts)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    batch, target = inputs(args, vlm.config, device)
    times, losses = [], []
    for step in range(args.steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = policy(batch, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step:  # the first step warms up (allocations, kernel choice)
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    out = {"mode": mode, "load_s": load_s, "footprint_mib": footprint / 2**20,
           "trainable_m": sum(p.numel() for p in trainable) / 1e6, "adapters": len(targets),
           "step_s": sum(times) / len(times), "peak_rss_mib": rss_mib(), "load_peak_rss_mib": load_peak,
           "base_rss_mib": base_rss, "loss_first": losses[0], "loss_last": losses[-1],
           "loadavg": os.getloadavg()[0], "allocator": allocator}
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
            f"torch_threads={torch.get_num_threads()} device={dev} "
            f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')} "
            f"loadavg={' '.join(f'{x:.1f}' for x in os.getloadavg())}\n"
            f"versions: python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, "
            f"bitsandbytes {bitsandbytes.__version__}")


def table(rows: list[dict], cuda: bool) -> str:
    head = ["mode", "load s", "param MiB", "RSS after load MiB", "peak RSS MiB", "peak RSS over imports",
            "peak vs fp32", "step s (load avg)", "trainable M (LoRA+head)", "loss first->last"]
    if cuda:
        head.insert(5, "GPU peak MiB")
    fp32 = next((r["peak_rss_mib"] for r in rows if r["mode"] == "fp32" and "error" not in r), None)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error']} |")
            continue
        ratio = f"{r['peak_rss_mib'] / fp32:.2f}" if fp32 else "-"
        cells = [r["mode"], f"{r['load_s']:.1f}", f"{r['footprint_mib']:.0f}",
                 f"{r['load_peak_rss_mib']:.0f}", f"{r['peak_rss_mib']:.0f}",
                 f"{r['peak_rss_mib'] - r['base_rss_mib']:.0f}", ratio,
                 f"{r['step_s']:.2f} ({r['loadavg']:.1f})", f"{r['trainable_m']:.2f}",
                 f"{r['loss_first']:.3f}->{r['loss_last']:.3f}"]
        if cuda:
            cells.insert(5, f"{r['gpu_peak_mib']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SIZES = ("text_hidden", "text_intermediate", "text_layers", "heads", "kv_heads", "vocab", "vision_depth",
         "vision_dim", "batch", "seq", "steps", "lora_r", "device", "allocator")


def child(args, *extra: str) -> dict:
    """Run this script with ``extra`` in a fresh process; its RESULT line, or an error row."""
    passthrough = [f"--{k}={getattr(args, k)}" for k in SIZES]
    proc = subprocess.run([sys.executable, __file__, *passthrough, *extra], capture_output=True, text=True)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not found:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:200]}"}
    return json.loads(found[-1][len("RESULT "):])


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text_hidden", type=int, default=896)
    p.add_argument("--text_intermediate", type=int, default=4864)
    p.add_argument("--text_layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--vision_depth", type=int, default=4)
    p.add_argument("--vision_dim", type=int, default=640)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=48)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--allocator", choices=("product", "all"), default="product",
                   help="CPU: apply ilstudio.training.allocator's policy as train.py does (product: in the "
                        "modes that quantize, bf16/int8/nf4; fp32 keeps glibc's defaults) or in every mode (all)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--checkpoint", help="build the checkpoint into this directory once and reuse it "
                   "(default: a temporary directory, removed at the end)")
    p.add_argument("--_build", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--_measure", nargs=2, metavar=("DIR", "MODE"), help=argparse.SUPPRESS)
    return p, p.parse_args()


def main() -> None:
    p, args = parse_args()
    if args._build:
        print("RESULT " + json.dumps(build_checkpoint(args, args._build)), flush=True)
        return
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
        if args.checkpoint:  # kept between runs: building 0.5 B random weights takes minutes
            tmp = args.checkpoint
        built = json.loads((Path(tmp) / "bench.json").read_text()) \
            if (Path(tmp) / "bench.json").is_file() else child(args, f"--_build={tmp}")
        if "error" in built:
            sys.exit(f"building the checkpoint failed: {built['error']}")
        (Path(tmp) / "bench.json").write_text(json.dumps(built))
        print(f"model: Qwen2-VL from its config, random weights, {built['params_m']:.0f}M parameters "
              f"(language model {built['lm_params_m']:.0f}M: hidden {args.text_hidden}, "
              f"{args.text_layers} layers, vocab {args.vocab}; vision {args.vision_depth} blocks x "
              f"{args.vision_dim}); safetensors {built['file_mib']:.0f} MiB; LoRA r={args.lora_r} on "
              f"every Linear of the language model; batch {args.batch} x seq {args.seq} with one "
              f"56x56 image each; {args.steps} timed steps", flush=True)
        for mode in modes:
            row = child(args, "--_measure", tmp, mode)
            rows.append({"mode": mode, **row})
            print(f"  {mode}: {'failed' if 'error' in row else 'done'}", flush=True)
    print(table(rows, args.device.startswith("cuda")))
    for said in sorted({r.get("allocator", "-") for r in rows if "error" not in r}):
        print(f"allocator ({', '.join(r['mode'] for r in rows if r.get('allocator') == said)}): {said}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
