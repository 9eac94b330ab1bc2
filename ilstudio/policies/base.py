"""What every policy configuration declares, and the checks that follow from it."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ilstudio.config.declare import CONFIGURABLES, param, params_of
from ilstudio.config.settings import images_enabled, inert_values
from ilstudio.errors import UserError
from ilstudio.policies.ensemble import query_every_param, temporal_ensemble_param


def dropout_param(default: float, doc: str) -> Any:
    """A policy's dropout rate: in [0, 1), and free to change on resume (it shapes no weight,
    so it is the one kind of policy setting that does not break resuming)."""
    return param(default, doc, documented=False, bounds="[0, 1)", breaks_resume=False)


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Base of a policy's settings dataclass.

    uses_images: the policy can read camera frames. needs_images: it cannot work without.
    Which shared parameters it gives an effect is declared with each parameter
    (``param(policies=...)``): any other documented parameter set away from its default is
    an error at validation time, never a silent no-op, unless its own switch is off
    (``lora.r`` while ``lora.enable`` is False): then it is inert and warned about.
    """

    name: ClassVar[str] = ""
    uses_images: ClassVar[bool] = False
    needs_images: ClassVar[bool] = False
    needs_language: ClassVar[bool] = False
    # The policy fits every camera frame to its own fixed input size (the VLA: its vision
    # tower's square) by dataset.image_aspect_ratio, so that setting acts even where
    # dataset.image_size leaves frames at their recorded size.
    fits_frames: ClassVar[bool] = False
    # A policy's own settings shape its network: changing one breaks resuming, unless the
    # parameter declares otherwise (``param(breaks_resume=False)``, e.g. a dropout rate).
    breaks_resume: ClassVar[bool] = True

    # The evaluation contract, declared for every policy (``<policy>.temporal_ensemble``,
    # ``<policy>.query_every`` in --help_gin and operative_config.gin): how the evaluator and
    # the in-training rollouts run it. A policy meant to be ensembled (ACT) redeclares the
    # first with True. The chunk size is ``model.chunk_size``; whether frames are read,
    # ``image_inputs`` (from ``uses_images``, ``task.camera_names`` and ``dataset.is_multimodal``).
    temporal_ensemble: bool = temporal_ensemble_param(False)
    query_every: int = query_every_param()

    def validate(self, *, task, dataset, model, lora, quantization, source_of) -> None:
        problems = []
        if self.needs_images and not task.camera_names:
            problems.append(f"policy '{self.name}' needs camera images, but task.camera_names is "
                            f"empty (set in {source_of('task.camera_names')})")
        if self.needs_images and not dataset.is_multimodal:
            problems.append(f"policy '{self.name}' needs camera images, but dataset.is_multimodal "
                            f"is False (set in {source_of('dataset.is_multimodal')})")
        problems += self._common_problems(task, dataset, model, source_of)
        # Values their switch turns off are warned about (resolve), never refused here.
        inert = set(inert_values(lora, quantization))
        for obj in (dataset, model, lora, quantization):
            for info in params_of(type(obj)):
                if info.yaml_key is None or info.honoured_by(self.name) or info.gin_key in inert:
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
        if dataset.image_aspect_ratio != "pad" and dataset.image_size is None \
                and not (self.fits_frames and images):
            problems.append(f"dataset.image_aspect_ratio = {dataset.image_aspect_ratio!r} (set in "
                            f"{source_of('dataset.image_aspect_ratio')}) has no effect: frames keep "
                            f"their recorded size for policy '{self.name}' unless "
                            "dataset.image_size = (H, W) is set")
        if not dataset.lazy_preprocess and not images and not self.needs_language:
            problems.append(f"dataset.lazy_preprocess = False (set in "
                            f"{source_of('dataset.lazy_preprocess')}) has no effect: policy "
                            f"'{self.name}' gets no images or text to preprocess here")
        if self.query_every > model.chunk_size:
            problems.append(f"{self.name}.query_every = {self.query_every} (set in "
                            f"{source_of(self.name + '.query_every')}) is longer than a chunk: "
                            f"model.chunk_size = {model.chunk_size}; use 1..{model.chunk_size}, "
                            f"or 0 for the whole chunk")
        if model.load_pretrain is True and not self.honours("model.is_pretrained"):
            problems.append(f"model.load_pretrain = True (set in {source_of('model.load_pretrain')}) "
                            f"starts the backbone from pretrained weights, but policy "
                            f"'{self.name}' has no pretrained backbone; to start from a previous "
                            f"ilstudio run, give its directory (model.load_pretrain = 'runs/x')")
        if model.pretrain_from:
            from ilstudio.models.state_io import weights_file

            try:
                weights_file(model.pretrain_from)
            except UserError as e:
                problems.append(f"{e} (set in {source_of('model.load_pretrain')})")
        return problems

    def honours(self, gin_key: str) -> bool:
        """Whether this policy gives the shared parameter ``gin_key`` an effect (as declared)."""
        configurable, _, name = gin_key.partition(".")
        info = next(i for i in params_of(CONFIGURABLES[configurable]) if i.name == name)
        return info.honoured_by(self.name)

    def image_inputs(self, task, dataset) -> bool:
        """Whether this policy gets camera frames: it can read them, and the data has them."""
        return self.uses_images and images_enabled(task, dataset)

