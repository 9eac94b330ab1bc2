"""The Hugging Face Trainer, taught about policies.

Kept thin on purpose: the Trainer already does devices, mixed precision, checkpointing,
resume and torchrun/accelerate. We add only what a policy needs: optimizer parameter
groups a policy asks for (a backbone or LoRA learning rate), and a run's config dumps
in TensorBoard.
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback


class PolicyTrainer(Trainer):
    """Trainer whose optimizer honours ``policy.optimizer_param_groups`` when present."""

    def create_optimizer(self, model=None):
        groups_fn = getattr(self.model, "optimizer_param_groups", None)
        if self.optimizer is None and callable(groups_fn):
            groups = groups_fn(self.args.learning_rate, self.args.weight_decay)
            if groups:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
                self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
                return self.optimizer
        return super().create_optimizer(model)


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
