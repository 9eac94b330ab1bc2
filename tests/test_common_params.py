"""The policy-independent documented parameters take effect (issue 3).

episode_first, image_aspect_ratio (+ dataset.image_size), lazy_preprocess, using_ema,
load_pretrain on real data, real Trainer runs and real train.py subprocesses; preload_data,
skip_mirrored_data, history_images_length and is_multimodal through the YAML path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_train, tiny_args
from safetensors.torch import load_file
from transformers import TrainerCallback

from ilstudio.config.settings import DatasetSettings, TaskSettings
from ilstudio.data.dataset import EpisodeDataset
from ilstudio.data.image_ops import fit_frames, letterbox_geometry
from ilstudio.data.normalization import compute_stats
from ilstudio.data.synthetic import write_synthetic_dataset
from ilstudio.errors import UserError

TASK = dict(state_dim=14, action_dim=14, camera_names=("top",))


def episode_paths(d: Path) -> list[Path]:
    return sorted(d.glob("episode_*.hdf5"), key=lambda p: int(p.stem.split("_")[1]))


def make_dataset(data: Path, chunk: int = 5, **settings) -> EpisodeDataset:
    paths = episode_paths(data)
    task = TaskSettings(dataset_dir=str(data), episode_len=50, **TASK)
    return EpisodeDataset(paths, task, DatasetSettings(**settings), chunk, compute_stats(paths))


# -- image_aspect_ratio / image_size -------------------------------------------------------


def test_pad_letterboxes_with_centered_zero_bands():
    frame = np.full((1, 24, 32, 3), 200, np.uint8)
    frame[0, :, :16] = 100  # left half darker: content must keep its layout
    out = fit_frames(frame, (32, 32), "pad")
    assert out.shape == (1, 32, 32, 3)
    assert (out[0, :4] == 0).all() and (out[0, 28:] == 0).all()  # bands top and bottom
    assert np.array_equal(out[0, 4:28], frame[0])  # scale 1: content untouched
    big = fit_frames(frame, (64, 64), "pad")  # scale 2: 48x64 content, 8-row bands
    rows = np.where(big[0].any(axis=(1, 2)))[0]
    assert (rows.min(), rows.max()) == (8, 55)
    assert (55 - 8 + 1) / 64 == pytest.approx(24 / 32)  # content aspect preserved
    assert letterbox_geometry((24, 32), (64, 64)) == ((48, 64), (8, 0))
    tall = fit_frames(frame, (64, 32), "pad")  # width-bound: bands top/bottom again, 20 rows
    assert (tall[0, :20] == 0).all() and (tall[0, 44:] == 0).all() and tall[0, 20:44].all()


def test_resize_stretches_without_bands():
    frame = np.full((2, 24, 32, 3), 200, np.uint8)
    out = fit_frames(frame, (32, 32), "resize")
    assert out.shape == (2, 32, 32, 3)
    assert out.min() == 200 and out.max() == 200  # every pixel is content, no zero band
    assert fit_frames(frame, None, "pad") is frame  # no image_size: frames as recorded


def test_dataset_samples_are_fitted(tiny_data):
    pad = make_dataset(tiny_data, image_size=(32, 32))[10]["images"]
    stretch = make_dataset(tiny_data, image_size=(32, 32), image_aspect_ratio="resize")[10]["images"]
    raw = make_dataset(tiny_data)[10]["images"]
    assert raw.shape == (1, 3, 24, 32) and pad.shape == stretch.shape == (1, 3, 32, 32)
    assert (pad[..., :4, :] == 0).all() and (pad[..., 28:, :] == 0).all()
    assert torch.equal(pad[..., 4:28, :], raw)
    assert (stretch[..., :4, :] > 0).any()
    with pytest.raises(UserError, match="dataset.image_size"):
        make_dataset(tiny_data, image_size=(32,))


# -- lazy_preprocess -----------------------------------------------------------------------


@pytest.mark.parametrize("preload", [False, True])
def test_lazy_and_eager_preprocess_give_identical_samples(tiny_data, preload):
    common = dict(image_size=(20, 20), image_aspect_ratio="pad", history_images_length=2,
                  preload_data=preload)
    lazy = make_dataset(tiny_data, lazy_preprocess=True, **common)
    eager = make_dataset(tiny_data, lazy_preprocess=False, **common)
    total_frames = len(eager)  # one camera: one frame per timestep
    assert lazy.frames_fitted == 0  # lazy: nothing done at construction
    assert eager.frames_fitted == total_frames  # eager: every frame once, up front
    for i in (0, 1, 49, 50, 123, len(eager) - 1):
        a, b = lazy[i], eager[i]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (i, k)
    assert eager.frames_fitted == total_frames  # drawing samples did no more work
    # per sample, per frame read: 2 with history 2, 1 at t=0 (i=0, 50: the frame is repeated)
    assert lazy.frames_fitted == 4 * 2 + 2 * 1


# -- episode_first -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory) -> list[Path]:
    """Two episodes of very different lengths: 10 and 200 steps."""
    root = tmp_path_factory.mktemp("uneven")
    short = write_synthetic_dataset(root / "a", num_episodes=1, episode_len=10, camera_names=())
    long = write_synthetic_dataset(root / "b", num_episodes=1, episode_len=200, camera_names=(),
                                   seed=1)
    return [*short, *long]


def tiny_trainer(out: Path, train_ds, *, ema_decay=None, episode_first=False, max_steps=4,
                 save_steps=1000, lr=1e-2, callbacks=()):
    from transformers import TrainingArguments, default_data_collator

    from ilstudio.policies.mlp.configuration import MLPConfig
    from ilstudio.policies.mlp.modeling import MLPPolicy
    from ilstudio.training.trainer import PolicyTrainer

    torch.manual_seed(0)
    model = MLPPolicy(MLPConfig(hidden_dim=32, num_layers=2), 14, 14, train_ds.chunk_size,
                      0, 1)
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, save_steps=save_steps,
                             per_device_train_batch_size=8, learning_rate=lr, seed=0,
                             report_to=[], use_cpu=True, dataloader_pin_memory=False,
                             logging_steps=1000, disable_tqdm=True, save_strategy="steps")
    return PolicyTrainer(model=model, args=args, train_dataset=train_ds,
                         data_collator=default_data_collator, callbacks=list(callbacks),
                         ema_decay=ema_decay, episode_first=episode_first)


def drawn_short_share(sampler) -> tuple[float, list[int]]:
    idx = list(iter(sampler))
    return float(np.mean(np.asarray(idx) < 10)), idx  # indices 0..9 are the short episode


def test_episode_first_changes_the_sampling_distribution(uneven_data, tmp_path):
    task = TaskSettings(dataset_dir="", episode_len=200, state_dim=14, action_dim=14)
    ds = EpisodeDataset(uneven_data, task, DatasetSettings(), 5, compute_stats(uneven_data))
    n = len(ds)  # 210 draws per epoch; pool 10 epochs for a tight estimate
    per_episode = tiny_trainer(tmp_path / "a", ds, episode_first=True)._get_train_sampler()
    per_step = tiny_trainer(tmp_path / "b", ds, episode_first=False)._get_train_sampler()
    shares = {}
    for name, sampler in (("episode_first", per_episode), ("uniform", per_step)):
        draws = []
        for epoch in range(10):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            draws += list(iter(sampler))
        k = int(np.sum(np.asarray(draws) < 10))
        shares[name] = (k, len(draws))
    # chi-square (1 dof) against the other mode's expected share; 3.84 is p=0.05, we need far more
    for name, expected in (("episode_first", 0.5), ("uniform", 10 / 210)):
        k, total = shares[name]
        chi2 = (k - total * expected) ** 2 / (total * expected * (1 - expected))
        assert chi2 < 10.8, (name, k, total)  # consistent with its own law (p > 0.001)
    k, total = shares["episode_first"]
    chi2_vs_uniform = (k - total * 10 / 210) ** 2 / (total * (10 / 210) * (200 / 210))
    assert chi2_vs_uniform > 1000, shares
    # deterministic per (seed, epoch); a new epoch draws a new order
    per_episode.set_epoch(3)
    _, a = drawn_short_share(per_episode)
    _, b = drawn_short_share(per_episode)
    per_episode.set_epoch(4)
    _, c = drawn_short_share(per_episode)
    assert a == b and a != c and len(a) == n


# -- using_ema (real Trainer runs) ---------------------------------------------------------


class RecordParams(TrainerCallback):
    """Records the live trainable weights after every optimizer step."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []
        self.initial: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.detach().clone() for n, p in model.named_parameters()})


@pytest.fixture(scope="module")
def state_ds(tiny_data):
    return make_dataset(tiny_data, is_multimodal=False)


def test_ema_weights_are_what_gets_saved(state_ds, tmp_path):
    rec = RecordParams()
    trainer = tiny_trainer(tmp_path / "ema", state_ds, ema_decay=0.5, max_steps=3, callbacks=[rec])
    trainer.train()
    trainer.save_model(str(tmp_path / "ema"))
    saved = load_file(str(tmp_path / "ema" / "model.safetensors"))
    expected = {n: t.clone() for n, t in rec.initial.items()}
    for i, step in enumerate(rec.steps):
        d = min(0.5, (1 + i) / (10 + i))
        for n in expected:
            expected[n] = d * expected[n] + (1 - d) * step[n]
    raw = rec.steps[-1]
    assert len(rec.steps) == 3
    for n in expected:
        torch.testing.assert_close(saved[n], expected[n], rtol=1e-6, atol=1e-7)
        assert not torch.equal(saved[n], raw[n]), n  # the EMA, not the live weights
    extra = load_file(str(tmp_path / "ema" / "ema.safetensors"))
    for n in raw:
        assert torch.equal(extra[f"raw.{n}"], raw[n])
    # the same run without EMA saves the live weights, which equal the EMA run's raw ones
    plain = tiny_trainer(tmp_path / "plain", state_ds, max_steps=3)
    plain.train()
    plain.save_model(str(tmp_path / "plain"))
    plain_saved = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert not (tmp_path / "plain" / "ema.safetensors").exists()
    for n in raw:
        torch.testing.assert_close(plain_saved[n], raw[n], rtol=0, atol=0)
        assert not torch.equal(plain_saved[n], saved[n])


def test_resume_is_exact_with_ema_and_episode_first(state_ds, tmp_path):
    """Checkpoint at 3, resume to 6: same weights, EMA and sample order as 6 straight steps."""
    full = tiny_trainer(tmp_path / "full", state_ds, ema_decay=0.9, episode_first=True,
                        max_steps=6, save_steps=3)
    full.train()
    full.save_model(str(tmp_path / "full"))
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / "ema.safetensors").is_file()
    resumed = tiny_trainer(tmp_path / "resumed", state_ds, ema_decay=0.9, episode_first=True,
                           max_steps=6, save_steps=1000)
    resumed.train(resume_from_checkpoint=str(ckpt))
    resumed.save_model(str(tmp_path / "resumed"))
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "full" / name))
        b = load_file(str(tmp_path / "resumed" / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}:{k}")


# -- through train.py and the YAML path ----------------------------------------------------


def write_yaml(path: Path, **keys) -> Path:
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
    return path


@pytest.fixture(scope="module")
def mirrored_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mirrored")
    write_synthetic_dataset(d, num_episodes=4, episode_len=30, mirrored_every=2)
    return d


@pytest.fixture(scope="module")
def yaml_run(mirrored_data, tmp_path_factory) -> Path:
    """preload_data + skip_mirrored_data + history_images_length=3 from a YAML file."""
    tmp = tmp_path_factory.mktemp("yaml_run")
    cfg = write_yaml(tmp / "train.yaml", preload_data=True, skip_mirrored_data=True,
                     history_images_length=3)
    out = tmp / "run"
    r = run_train(*tiny_args(mirrored_data, out, f"--training_config={cfg}", "--max_steps=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_yaml_preload_skip_mirrored_history(yaml_run):
    summary = json.loads((yaml_run / "data_summary.json").read_text())
    assert summary["episodes_found"] == 4
    assert summary["episodes_mirrored_skipped"] == 2  # episodes 1 and 3 are mirrored
    assert summary["episodes_train"] == 2 and summary["timesteps_train"] == 60
    weights = load_file(str(yaml_run / "model.safetensors"))
    # MLP input = state (14) + cameras x history (1 x 3) image features (64 each)
    assert weights["mlp.0.weight"].shape[1] == 14 + 3 * 64
    assert "preload_data = True" in (yaml_run / "operative_config.gin").read_text()


def test_yaml_state_only_ema_episode_first(tiny_data, tmp_path):
    cfg = write_yaml(tmp_path / "t.yaml", is_multimodal=False, using_ema=True, episode_first=True)
    out = tmp_path / "run"
    r = run_train(*tiny_args(tiny_data, out, f"--training_config={cfg}", "--max_steps=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "data_summary.json").read_text())["cameras"] == []
    saved = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith("image_encoder") for k in saved)  # state-only input
    ema = load_file(str(out / "ema.safetensors"))
    for k, v in saved.items():
        assert torch.equal(v, ema[f"ema.{k}"])
    assert any(not torch.equal(saved[k], ema[f"raw.{k}"]) for k in saved)


def test_load_pretrain_initialises_the_policy(yaml_run, mirrored_data, tmp_path):
    # same architecture (history 3), eager resize preprocessing; lr 0 keeps the loaded weights
    cfg = write_yaml(tmp_path / "t.yaml", skip_mirrored_data=True, history_images_length=3,
                     lazy_preprocess=False, image_aspect_ratio="resize", learning_rate=0.0)
    out = tmp_path / "run"
    r = run_train(*tiny_args(mirrored_data, out, f"--training_config={cfg}", "--max_steps=1",
                             "--gin_bindings=dataset.image_size = (16, 16)",
                             f"--gin_bindings=model.load_pretrain = '{yaml_run}'"))
    assert r.returncode == 0, r.stderr[-3000:]
    before = load_file(str(yaml_run / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_load_pretrain_mismatch_names_keys(yaml_run, mirrored_data, tmp_path):
    from ilstudio.models.state_io import load_pretrained_policy
    from ilstudio.policies.mlp.configuration import MLPConfig
    from ilstudio.policies.mlp.modeling import MLPPolicy

    other = MLPPolicy(MLPConfig(), 14, 14, 20, 1, 1)  # history 1: first layer narrower
    with pytest.raises(UserError, match=r"model\.load_pretrain.*\n.*mlp\.0\.weight"):
        load_pretrained_policy(other, str(yaml_run))
    with pytest.raises(UserError, match=r"model\.load_pretrain.*no model\.safetensors"):
        load_pretrained_policy(other, str(tmp_path))
    # a missing run is found at validation time (--dry_run too), before anything is written
    for extra in (["--dry_run"], []):
        r = run_train(*tiny_args(mirrored_data, tmp_path / "x", "--max_steps=1", *extra,
                                 "--gin_bindings=model.load_pretrain = '/nonexistent/run'"))
        assert r.returncode == 2 and "model.load_pretrain" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        assert not (tmp_path / "x").exists()


def test_validation_refuses_no_op_settings(tiny_data, tmp_path):
    r = run_train(*tiny_args(tiny_data, tmp_path / "o", "--max_steps=1", "--dry_run",
                             "--gin_bindings=dataset.image_aspect_ratio = 'resize'",
                             "--gin_bindings=dataset.is_multimodal = False",
                             "--gin_bindings=dataset.lazy_preprocess = False"))
    assert r.returncode == 2
    assert "dataset.image_aspect_ratio" in r.stderr and "dataset.image_size" in r.stderr
    assert "dataset.lazy_preprocess" in r.stderr


def test_episode_first_under_distributed_sharding(uneven_data):
    """With 2 ranks, accelerate shards the batches of identical per-rank samplers: together
    the ranks draw exactly the single-process sequence (same episode-uniform law)."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from ilstudio.training.sampling import EpisodeFirstSampler

    index, lengths = np.repeat([0, 1], [10, 200]), [10, 200]
    single = list(BatchSampler(EpisodeFirstSampler(index, lengths, seed=7), 4, drop_last=False))
    per_rank = [list(BatchSamplerShard(BatchSampler(EpisodeFirstSampler(index, lengths, seed=7), 4,
                                                    drop_last=False), num_processes=2,
                                       process_index=r)) for r in range(2)]
    interleaved = [b for pair in zip(*per_rank, strict=True) for b in pair]
    assert interleaved[:len(single) - 1] == single[:len(single) - 1]
    drawn = np.concatenate([np.concatenate(p) for p in per_rank])
    assert 0.35 < np.mean(drawn < 10) < 0.65  # still episode-uniform, not 10/210


def test_load_pretrain_into_a_lora_wrapped_policy(yaml_run):
    """A run trained without LoRA initialises the same policy with LoRA adapters added."""
    from peft import LoraConfig, inject_adapter_in_model

    from ilstudio.models.state_io import load_pretrained_policy
    from ilstudio.policies.mlp.configuration import MLPConfig
    from ilstudio.policies.mlp.modeling import MLPPolicy

    torch.manual_seed(123)
    policy = MLPPolicy(MLPConfig(), 14, 14, 20, 1, 3)
    policy = inject_adapter_in_model(LoraConfig(target_modules=["mlp.0"], r=2), policy)
    load_pretrained_policy(policy, str(yaml_run))
    saved = load_file(str(yaml_run / "model.safetensors"))
    assert torch.equal(policy.mlp[0].base_layer.weight, saved["mlp.0.weight"])
    assert torch.equal(policy.mlp[3].weight, saved["mlp.3.weight"])
