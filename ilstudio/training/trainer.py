"""The Hugging Face Trainer, taught about policies.

Kept thin on purpose: the Trainer already does devices, mixed precision, checkpointing,
resume and torchrun/accelerate. We add only what a policy needs: optimizer parameter
groups a policy asks for (a backbone or LoRA learning rate), and a run's config dumps
in TensorBoard.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers import Trainer, TrainerCallback

from ilstudio import rundir, sigint_seen
from ilstudio.errors import UserError


class NonFiniteLossError(UserError):
    """Training produced a NaN/inf loss or weights: stop before it reaches a checkpoint."""


def _in_training_mode(mode: bool = True):
    """Stands in for ``model.train()`` while every module is in training mode already."""
    if not mode:
        raise RuntimeError("model.train(False) inside a training step")


def cache_accelerate_lomo_check() -> None:
    """accelerate's optimizer wrapper asks ``is_lomo_available()`` twice per step, and each
    ask is an ``importlib.util.find_spec`` plus a metadata read (~1-2 ms a step on a busy
    CPU, bench/overhead.py's profile). Whether lomo_optim is installed cannot change while a
    run trains: answer it once per process."""
    import functools

    from accelerate import optimizer as accelerate_optimizer

    check = accelerate_optimizer.is_lomo_available
    if not hasattr(check, "cache_info"):
        accelerate_optimizer.is_lomo_available = functools.cache(check)


class PolicyTrainer(Trainer):
    """Trainer whose optimizer honours ``policy.optimizer_param_groups`` when present.

    ema_decay: keep an EMA of the trainable weights (model.using_ema); saves carry it.
    episode_first: draw training samples episode-uniformly (dataset.episode_first).
    """

    def __init__(self, *args, ema_decay: float | None = None, episode_first: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cache_accelerate_lomo_check()
        from ilstudio.training.ema import EMA, EMACallback

        self.episode_first = episode_first
        self.add_callback(ApplyIntervalsOnResume())
        self.add_callback(LostInterrupt())
        self.ema = EMA(ema_decay) if ema_decay is not None else None
        if self.ema is not None:
            self.add_callback(EMACallback(self.ema))

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Every printed log line names its optimizer step, not only the epoch."""
        super().log({"step": self.state.global_step, **logs}, *args, **kwargs)

    def create_optimizer(self, model=None):
        groups_fn = getattr(self.model, "optimizer_param_groups", None)
        if self.optimizer is None and callable(groups_fn):
            groups = groups_fn(self.args.learning_rate, self.args.weight_decay)
            if groups:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
                self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        if self.optimizer is None:
            super().create_optimizer(model)
        # What this run's configuration asks of every parameter group (lr, weight decay,
        # betas, eps, ...): a resume restores the checkpoint's values over these, and
        # _load_optimizer_and_scheduler puts these back.
        self._configured_groups = [{k: v for k, v in g.items() if k != "params"}
                                   for g in self.optimizer.param_groups]
        return self.optimizer

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Restore the optimizer's state (moments) and the scheduler's position, then apply
        this run's hyperparameters: a learning rate, weight decay, Adam betas/eps or
        schedule changed on resume takes effect from the resumed step (restored as saved,
        they would silently keep the old values)."""
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except ValueError as e:  # torch: the parameter groups differ from the saved ones
            raise UserError(
                f"cannot resume from {checkpoint}: the optimizer's parameter groups differ from "
                f"the saved ones ({e}). A change of which parameters train, or of lora.lr between "
                f"unset and set, cannot be applied to a saved optimizer state; undo it, or start "
                f"a new run.") from None
        if checkpoint is None or self.is_deepspeed_enabled:
            return
        configured = getattr(self, "_configured_groups", None)
        groups = self.optimizer.param_groups
        if configured is None or len(configured) != len(groups):
            return
        for group, conf in zip(groups, configured, strict=True):
            for key, value in conf.items():
                if key not in ("lr", "initial_lr"):
                    group[key] = value
            group["initial_lr"] = conf.get("initial_lr", conf["lr"])
        sched = self.lr_scheduler
        base = [g["initial_lr"] for g in groups]
        if hasattr(sched, "lr_lambdas"):  # LambdaLR: every schedule transformers makes but plateau
            sched.base_lrs = base
            for group, lr0, fn in zip(groups, base, sched.lr_lambdas, strict=True):
                group["lr"] = lr0 * fn(sched.last_epoch)
            sched._last_lr = [g["lr"] for g in groups]  # noqa: SLF001 (what get_last_lr reports)
        elif base != getattr(sched, "base_lrs", base):
            raise UserError(f"cannot resume from {checkpoint}: a learning rate changed and the "
                            f"{type(sched).__name__} schedule cannot take a new one mid-run; "
                            f"undo the change or start a new run.")

    def planned_max_steps(self) -> int:
        """The optimizer steps this run's configuration asks for (--max_steps, or the
        epochs' worth), computed as training will."""
        return int(self.set_initial_training_values(self.args, self.get_train_dataloader())[-1])

    @staticmethod
    def checkpoint_step(checkpoint: str) -> int:
        import json

        return int(json.loads((Path(checkpoint) / rundir.TRAINER_STATE).read_text())["global_step"])

    def finish_from_checkpoint(self, checkpoint: str):
        """The end of a run killed after its last checkpoint (at max_steps) but before its
        final save: the checkpoint's weights (EMA included) and state become the run's, with
        no training step, so the run ends as an uninterrupted one."""
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(str(Path(checkpoint) / rundir.TRAINER_STATE))
        return TrainOutput(self.state.global_step, 0.0, {})

    def _clip_grad_norm(self, model):
        """``torch.nn.utils.clip_grad_norm_`` itself where nothing else can apply: one process
        or DDP (plain tensors), no fp16 loss scaling. transformers routes every step through
        accelerate's DTensor-aware clipping (device-mesh checks, a version test and a fresh
        parameter list per step: bench/overhead.py measured it on small policies); the norm
        and the clipped gradients are the same. Anything else takes transformers' path."""
        from accelerate.utils import DistributedType

        fast = getattr(self, "_plain_clip", None)
        if fast is None:
            acc = self.accelerator
            fast = (acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                             DistributedType.MULTI_GPU)
                    and not (acc.native_amp and acc.mixed_precision == "fp16")
                    and not self._has_mixed_mesh_grads(model)
                    and not any(type(p.grad).__name__ == "DTensor" for p in model.parameters()
                                if p.grad is not None))
            self._plain_clip = fast
            self._clip_params = [p for p in model.parameters() if p.requires_grad]
        if not fast:
            return super()._clip_grad_norm(model)
        import torch

        return torch.nn.utils.clip_grad_norm_(self._clip_params, self.args.max_grad_norm)

    def training_step(self, model, inputs, *args, **kwargs):
        """transformers' step, minus its ``model.train()`` when every module is in training
        mode already: that call walks the whole module tree on each step (about 1 ms on small
        policies under load, bench/overhead.py), while reading the cached modules' flags costs
        microseconds. After an evaluation left modules in eval mode, ``train()`` runs as usual."""
        modules = getattr(self, "_step_modules", None)
        if modules is None or modules[0] is not model:
            modules = self._step_modules = (model, list(model.modules()))
        if not all(m.training for m in modules[1]):
            return super().training_step(model, inputs, *args, **kwargs)
        model.train = _in_training_mode  # shadows Module.train on this instance for one step
        try:
            return super().training_step(model, inputs, *args, **kwargs)
        finally:
            del model.train

    def _get_train_sampler(self, train_dataset=None):
        if not self.episode_first:
            return super()._get_train_sampler(train_dataset)
        from ilstudio.training.sampling import EpisodeFirstSampler

        ds = train_dataset if train_dataset is not None else self.train_dataset
        return EpisodeFirstSampler(ds.episode_index, ds.episode_lengths, self.args.seed)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints and the final model carry the EMA weights (plus ema.safetensors)."""
        if self.ema is not None and self.ema.shadow is not None:
            state_dict = self.ema.substitute(
                self.model, self.model.state_dict() if state_dict is None else state_dict)
            if self.args.should_save:
                out = output_dir if output_dir is not None else self.args.output_dir
                os.makedirs(out, exist_ok=True)
                self.ema.save(out, self.model)
        super()._save(output_dir, state_dict)
        from ilstudio.models.adapter_io import has_lora, save_adapter

        if self.args.should_save and has_lora(self.model):
            # LoRA runs also get the adapter + trainable non-LoRA weights (peft format), so
            # evaluation rebuilds base + adapter (ilstudio.models.load_adapter_run).
            save_adapter(self.model, output_dir if output_dir is not None else self.args.output_dir,
                         state_dict)  # the EMA weights when model.using_ema, as model.safetensors

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        from ilstudio.models.quantization import restore_quantized_weights
        from ilstudio.training.ema import restore

        # load_state_dict skips bitsandbytes 4-bit quantization state: rebuild those weights.
        restore_quantized_weights(self.model, resume_from_checkpoint)

        restore(resume_from_checkpoint, self.model, self.ema)

    def save_state(self) -> None:
        """trainer_state.json beside the run, atomically (and so in the run's manifest): the
        last file a run writes, which says it finished."""
        if not self.is_world_process_zero():
            return
        with rundir.atomic_path(Path(self.args.output_dir) / rundir.TRAINER_STATE) as tmp:
            self.state.save_to_json(str(tmp))

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = super().compute_loss(model, inputs, *args, **kwargs)
        loss = out[0] if isinstance(out, tuple) else out
        # Checked before backward: a NaN never reaches the weights, the optimizer or a checkpoint.
        if not bool(loss.detach().isfinite().all()):
            raise NonFiniteLossError(
                f"training stopped at step {self.state.global_step + 1}: the loss is "
                f"{loss.detach().float().mean().item()} (not finite). The weights were not updated "
                f"with it; {self._last_checkpoint_note()} Common causes: NaN/inf values in the "
                f"episodes (/action, /observations/qpos) or a learning rate too high "
                f"(--learning_rate={self.args.learning_rate}).")
        return out

    def _last_checkpoint_note(self) -> str:
        out = self.args.output_dir
        last = rundir.last_complete_checkpoint(out) if out else None
        return (f"the last complete checkpoint is {last}." if last
                else "no checkpoint had been written yet.")

    def _save_checkpoint(self, model, trial):
        """Save into a staging directory, then rename it to checkpoint-N (atomic on POSIX).

        transformers writes checkpoint-N file by file; a kill in between leaves a directory
        that get_last_checkpoint would pick. Here checkpoint-N appears only once complete.
        """
        import torch
        from transformers.trainer_utils import rotate_checkpoints

        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise NonFiniteLossError(
                f"training stopped at step {self.state.global_step}: weights {', '.join(bad[:3])} "
                f"are not finite, so no checkpoint was written; {self._last_checkpoint_note()} "
                f"Lower --learning_rate (now {self.args.learning_rate}) or check the data.")
        run_dir = self._get_output_dir(trial=trial)
        name = rundir.checkpoint_name(self.state.global_step)
        staging = os.path.join(run_dir, rundir.STAGING_DIR)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            try:
                os.makedirs(staging)
            except OSError as e:
                raise UserError(f"could not write {name} in {run_dir}: {e}") from None
        if self.args.world_size > 1:  # every rank writes its rng_state_<rank>.pth into staging
            self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: staging  # only for the duration of the save
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:  # disk full, read-only, quota: never leave a partial checkpoint
            shutil.rmtree(staging, ignore_errors=True)
            if not rundir.is_write_failure(e):
                raise
            raise UserError(
                f"could not write {name} in {run_dir}: {e}. The partial checkpoint was removed; "
                f"{self._last_checkpoint_note()} Free space or fix permissions, then resume "
                f"with --resume_from_checkpoint=true.") from None
        finally:
            del self._get_output_dir
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        # An older save of the same step is replaced.
        rundir.publish_dir(os.path.join(staging, name), os.path.join(run_dir, name))
        shutil.rmtree(staging, ignore_errors=True)
        if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
            self.state.best_model_checkpoint = os.path.join(
                run_dir, os.path.basename(self.state.best_model_checkpoint))
        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)


class ApplyIntervalsOnResume(TrainerCallback):
    """The logging/evaluation/saving intervals of this run's arguments, also on resume.

    transformers restores them with the TrainerState from the checkpoint, so a
    --logging_steps or --save_steps changed on resume would be recorded and ignored.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)


class LostInterrupt(TrainerCallback):
    """Ctrl-C whose KeyboardInterrupt was lost: when the SIGINT handler raises while Python
    runs a finalizer (a tensor's ``__del__``, a weakref callback, the garbage collector), the
    exception is reported as "Exception ignored" and dropped, and training would go on as if
    nothing had happened (tests/test_signals.py swallows one that way). The handler also
    records the signal (``ilstudio.sigint_seen``), so the next step boundary raises it again
    and the run ends as any Ctrl-C does: one line, exit code 130."""

    def on_step_end(self, args, state, control, **kwargs):
        if sigint_seen():  # the end of one step is the boundary before the next
            raise KeyboardInterrupt


class StopOnSignal(TrainerCallback):
    """SIGTERM (a cluster scheduler's notice before preemption) during training: finish the
    current optimizer step, save a checkpoint at it, and stop (the caller then exits).
    Resuming from that checkpoint continues bit-identically, as from any other."""

    def __init__(self) -> None:
        self.requested = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


class RecordLogFiles(TrainerCallback):
    """TensorBoard writes its event files itself: record the ones this run creates in the
    run's manifest (at the start, every log and save, and the end), so --overwrite_output_dir
    knows them, and a user's file beside them stays the user's."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = Path(log_dir)
        self.before = self._files()
        self.recorded: set[Path] = set()

    def _files(self) -> set[Path]:
        if not self.log_dir.is_dir():
            return set()
        return {p for p in self.log_dir.rglob("events.out.tfevents.*") if p.is_file()}

    def _record(self, state) -> None:
        if not state.is_world_process_zero:
            return
        for p in sorted(self._files() - self.before - self.recorded):
            rundir.record_written(p)
            self.recorded.add(p)

    def on_train_begin(self, args, state, control, **kwargs):
        self._record(state)

    def on_log(self, args, state, control, **kwargs):
        self._record(state)

    def on_save(self, args, state, control, **kwargs):
        self._record(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._record(state)


class OperativeConfigToTensorBoard(TrainerCallback):
    """Logs the operative gin config as text, so a TensorBoard run says what it was."""

    def __init__(self, log_dir: str, text: str) -> None:
        self.log_dir, self.text = log_dir, text

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(self.log_dir) as writer:
            # Markdown code block keeps gin's alignment readable in TensorBoard's text tab.
            writer.add_text("config/operative_config", "```\n" + self.text + "\n```", 0)
