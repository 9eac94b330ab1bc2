"""What every policy configuration declares, and the checks that follow from it."""

from __future__ import annotations

from typing import ClassVar

from ilstudio.config.declare import params_of
from ilstudio.config.settings import images_enabled
from ilstudio.errors import UserError

# Stable parameters the shared data and training code gives meaning for every policy.
COMMON_SUPPORT = frozenset({
    "dataset.preload_data",
    "dataset.is_multimodal",
    "dataset.skip_mirrored_data",
    "dataset.history_images_length",
    "dataset.episode_first",
    "dataset.image_aspect_ratio",
    "dataset.lazy_preprocess",
    "model.using_ema",
    "model.load_pretrain",
})


class PolicyConfig:
    """Mixin for a policy's settings dataclass.

    uses_images: the policy can read camera frames. needs_images: it cannot work without.
    supports: documented stable parameters (gin keys) that this policy gives an effect
        beyond COMMON_SUPPORT. Any other documented parameter set away from its default is
        an error at validation time, never a silent no-op.
    """

    name: ClassVar[str] = ""
    uses_images: ClassVar[bool] = False
    needs_images: ClassVar[bool] = False
    needs_language: ClassVar[bool] = False
    supports: ClassVar[frozenset[str]] = frozenset()

    def validate(self, *, task, dataset, model, lora, quantization, source_of) -> None:
        problems = []
        if self.needs_images and not task.camera_names:
            problems.append(f"policy '{self.name}' needs camera images, but task.camera_names is "
                            f"empty (set in {source_of('task.camera_names')})")
        if self.needs_images and not dataset.is_multimodal:
            problems.append(f"policy '{self.name}' needs camera images, but dataset.is_multimodal "
                            f"is False (set in {source_of('dataset.is_multimodal')})")
        problems += self._common_problems(task, dataset, model, source_of)
        allowed = COMMON_SUPPORT | self.supports
        for obj in (dataset, model, lora, quantization):
            for info in params_of(type(obj)):
                if info.yaml_key is None or info.gin_key in allowed:
                    continue
                value = getattr(obj, info.name)
                if value != info.default:
                    problems.append(f"{info.gin_key} = {value!r} (set in {source_of(info.gin_key)}) "
                                    f"has no effect on policy '{self.name}'; remove it or choose "
                                    f"a policy that supports it")
        if problems:
            raise UserError("invalid configuration:\n  " + "\n  ".join(problems))

    def _validate_with(self, problems: list[str], **context) -> None:
        """Run the shared checks and report them together with a policy's own ``problems``
        in one message (a user fixes everything in one round)."""
        try:
            PolicyConfig.validate(self, **context)
        except UserError as e:
            if not problems:
                raise
            raise UserError(str(e) + "\n  " + "\n  ".join(problems)) from None
        if problems:
            raise UserError("invalid configuration:\n  " + "\n  ".join(problems))

    def _common_problems(self, task, dataset, model, source_of) -> list[str]:
        """Shared parameters whose effect depends on others (never a silent no-op)."""
        problems = []
        images = self.image_inputs(task, dataset)
        if dataset.image_size is not None and not images:
            problems.append(f"dataset.image_size = {dataset.image_size!r} (set in "
                            f"{source_of('dataset.image_size')}) has no effect: policy "
                            f"'{self.name}' gets no camera images here")
        if dataset.image_aspect_ratio != "pad" and dataset.image_size is None:
            problems.append(f"dataset.image_aspect_ratio = {dataset.image_aspect_ratio!r} (set in "
                            f"{source_of('dataset.image_aspect_ratio')}) has no effect: frames keep "
                            "their recorded size unless dataset.image_size = (H, W) is set")
        if not dataset.lazy_preprocess and not images and not self.needs_language:
            problems.append(f"dataset.lazy_preprocess = False (set in "
                            f"{source_of('dataset.lazy_preprocess')}) has no effect: policy "
                            f"'{self.name}' gets no images or text to preprocess here")
        if model.load_pretrain:
            from ilstudio.models.state_io import weights_file

            try:
                weights_file(model.load_pretrain)
            except UserError as e:
                problems.append(f"{e} (set in {source_of('model.load_pretrain')})")
        return problems

    def image_inputs(self, task, dataset) -> bool:
        """Whether this policy gets camera frames: it can read them, and the data has them."""
        return self.uses_images and images_enabled(task, dataset)

