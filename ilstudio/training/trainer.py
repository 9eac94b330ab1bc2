"""The Hugging Face Trainer, taught about policies.

Kept thin on purpose: the Trainer already does devices, mixed precision, checkpointing,
resume and torchrun/accelerate. We add only what a policy needs: optimizer parameter
groups a policy asks for (a backbone or LoRA learning rate), and a run's config dumps
in TensorBoard.
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback


class PolicyTrainer(Trainer):
    """Trainer whose optimizer honours ``policy.optimizer_param_groups`` when present.

    ema_decay: keep an EMA of the trainable weights (model.using_ema); saves carry it.
    episode_first: draw training samples episode-uniformly (dataset.episode_first).
    """

    def __init__(self, *args, ema_decay: float | None = None, episode_first: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from ilstudio.training.ema import EMA, EMACallback

        self.episode_first = episode_first
        self.ema = EMA(ema_decay) if ema_decay is not None else None
        if self.ema is not None:
            self.add_callback(EMACallback(self.ema))

    def create_optimizer(self, model=None):
        groups_fn = getattr(self.model, "optimizer_param_groups", None)
        if self.optimizer is None and callable(groups_fn):
            groups = groups_fn(self.args.learning_rate, self.args.weight_decay)
            if groups:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
                self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
                return self.optimizer
        return super().create_optimizer(model)

    def _get_train_sampler(self, train_dataset=None):
        if not self.episode_first:
            return super()._get_train_sampler(train_dataset)
        from ilstudio.training.sampling import EpisodeFirstSampler

        ds = train_dataset if train_dataset is not None else self.train_dataset
        return EpisodeFirstSampler(ds.episode_index, ds.episode_lengths, self.args.seed)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints and the final model carry the EMA weights (plus ema.safetensors)."""
        import os

        if self.ema is not None and self.ema.shadow is not None:
            state_dict = self.ema.substitute(
                self.model, self.model.state_dict() if state_dict is None else state_dict)
            if self.args.should_save:
                out = output_dir if output_dir is not None else self.args.output_dir
                os.makedirs(out, exist_ok=True)
                self.ema.save(out, self.model)
        super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        from ilstudio.training.ema import restore

        restore(resume_from_checkpoint, self.model, self.ema)


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
