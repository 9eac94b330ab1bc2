"""The stable parameters: the four configurables users bind in .gin files, plus the task
and its simulator settings.

Each class is a gin configurable with a short name (``dataset``, ``model``, ``lora``,
``quantization``, ``task``), so ``--gin_bindings='lora.r=16'`` works. Constructing one is
cheap and imports nothing heavy: ``--dry_run`` builds them all to validate a config
without touching torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ilstudio.config.declare import configurable, param, params_of

# Which policies give a parameter an effect (``param(policies=...)``; unset: every policy).
HF_BACKBONE = ("act", "vla")  # built from a Hugging Face backbone directory
VLA_ONLY = ("vla",)  # language targets, LoRA/QLoRA, the multimodal projector


@configurable("task", group="Task")
class TaskSettings:
    """What the data is: bound by gin_configs/tasks/<task_name>.gin."""

    dataset_dir: tuple[str, ...] | str = param(
        "", "Directory of episode_*.hdf5 files (ACT layout), a LeRobot dataset directory (v2.1 or "
        "v3.0: it holds meta/info.json) or hub dataset repo id; or a list of these, trained on "
        "together.", documented=False)
    state_dim: int = param(14, "Length of /observations/qpos (LeRobot: observation.state) per step; "
                           "unbound, a LeRobot dataset's info.json gives it.", documented=False,
                           bounds="[1, inf)", breaks_resume=True)
    action_dim: int = param(14, "Length of /action per step; unbound, a LeRobot dataset's "
                            "info.json gives it.", documented=False,
                            bounds="[1, inf)", breaks_resume=True)
    camera_names: tuple[str, ...] = param((), "Cameras under /observations/images (LeRobot: "
                                          "observation.images.<name>; unbound: all of them).",
                                          documented=False, breaks_resume=True)
    episode_len: int = param(400, "Steps per episode (also the evaluation horizon).",
                             documented=False, bounds="[1, inf)")
    data_command: str = param("", "The command that creates this task's data, shown when "
                              "task.dataset_dir is missing or empty ('{dataset_dir}' is filled in).",
                              documented=False)


@configurable("dataset", group="Data processing")
class DatasetSettings:
    """How episodes become training samples."""

    preload_data: bool = param(False, "Read every episode into memory once (parallel reads) "
                               "instead of opening files per sample.")
    lazy_preprocess: bool = param(True, "True: per-sample processing runs when a sample is drawn; "
                                  "false: it runs once up front and is cached.")
    episode_first: bool = param(False, "True: draw an episode uniformly, then a timestep in it; "
                                "false: draw uniformly over all timesteps.")
    use_reasoning: bool = param(False, "Add the episode's per-step reasoning text to the language target.",
                                policies=VLA_ONLY)
    use_prev_subtask: bool = param(False, "Add the previous subtask's text to the prompt.",
                                   policies=VLA_ONLY)
    select_seg_token_mask: bool = param(False, "The language loss covers only the selected segments "
                                        "(reasoning/subtask tokens); prompt tokens are masked out.",
                                        policies=VLA_ONLY)
    is_multimodal: bool = param(True, "Samples carry camera images; false gives a state-only input "
                                "even when the data has cameras.", breaks_resume=True)
    image_aspect_ratio: str = param("pad", "How frames are fitted to the model input: 'pad' "
                                    "(letterbox) or 'resize' (stretch; 'square' is the LLaVA / "
                                    "IL-Studio name for the same plain resize). On a VLM whose "
                                    "processor takes a fixed size (LLaVA, PaliGemma, Idefics3) "
                                    "frames are fitted to that size this way first.",
                                    choices=("pad", "resize", "square"))
    skip_mirrored_data: bool = param(False, "Leave out episodes marked as mirrored.")
    video_cache_mb: int = param(1024, "LeRobot mp4 data read lazily: MiB of decoded episodes kept "
                                "in all (DataLoader workers get an equal share each). When a "
                                "dataset's decoded frames fit a share, an episode is decoded whole "
                                "on its first sample; otherwise frames are decoded per sample. "
                                "0: off.", documented=False, bounds="[0, inf)")
    history_images_length: int = param(1, "Frames per camera the policy sees, current included "
                                        "(on a VLM: every camera's frames, each an image of the "
                                        "prompt, oldest first).",
                                        bounds="[1, inf)", breaks_resume=True)
    val_fraction: float = param(0.1, "Share of episodes held out for evaluation when --do_eval.",
                                documented=False, bounds="[0, 1)")
    image_size: tuple[int, ...] | None = param(
        None, "(H, W) the frames are fitted to (by image_aspect_ratio) before the policy sees "
        "them; None keeps frames as recorded. On a dynamic-resolution VLM (Qwen2-VL, "
        "Qwen2.5-VL) it also caps the processor's pixel budget at H*W, so it bounds the "
        "number of image tokens.", documented=False, bounds="[1, inf)",
        length=2, breaks_resume=True)


@configurable("model", group="Model architecture")
class ModelSettings:
    """Which policy to build and how."""

    policy: str = param("mlp", "The policy to build (see ilstudio/policies).", documented=False,
                        breaks_resume=True)
    chunk_size: int = param(20, "Actions predicted per step (action chunk length).", documented=False,
                           bounds="[1, inf)", breaks_resume=True)
    model_name_or_path: str = param("", "The backbone to build from: a Hugging Face "
                                    "image-text-to-text checkpoint (Qwen2-VL, Qwen2.5-VL, "
                                    "Idefics3/SmolVLM, PaliGemma, LLaVA: a directory, or a hub "
                                    "id found in cache_dir) loaded with its own processor, or a "
                                    "two-folder vision/ + llm/ directory.",
                                    breaks_resume=True, policies=HF_BACKBONE)
    is_pretrained: bool = param(False, "True: load backbone weights from model_name_or_path; "
                                "false: build from its config (AutoConfig) with random weights.",
                                policies=HF_BACKBONE)
    using_ema: bool = param(False, "Keep an EMA of the trainable weights; checkpoints carry the EMA weights.",
                            breaks_resume=True)
    ema_decay: float = param(0.999, "EMA decay per optimizer step (warmed up as "
                             "min(decay, (1+n)/(10+n)) over the first steps).", documented=False,
                             bounds="[0, 1)")
    flash_attn: bool = param(False, "Use FlashAttention-2 in the backbone (CUDA + flash-attn "
                             "only; refused with a message elsewhere).",
                             policies=VLA_ONLY)
    freeze_vision_tower: bool = param(False, "The vision encoder's weights do not change (on a "
                                      "VLM: its vision tower, e.g. `visual`, `vision_tower`, "
                                      "`vision_model`; a projector inside it still trains).",
                                      breaks_resume=True, policies=HF_BACKBONE)
    freeze_backbone: bool = param(False, "The language/visual backbone's weights do not "
                                  "change (on a VLM: vision tower, language model and LM head; "
                                  "its projector, the action head and LoRA adapters train).",
                                  breaks_resume=True, policies=HF_BACKBONE)
    tune_mm_mlp_adapter: bool = param(False, "Train only the multimodal projector (on a VLM "
                                      "its own: `multi_modal_projector`, `connector`, "
                                      "`visual.merger`) plus the action head.",
                                      breaks_resume=True, policies=VLA_ONLY)
    llm_loss_weight: float = param(0.0, "Weight of the language-modelling loss added to the "
                                  "action loss (on a VLM computed with its own LM head).",
                                  bounds="[0, inf)", policies=VLA_ONLY)
    load_pretrain: bool | str | None = param(
        None, "A path: initialise the whole policy from a previous ilstudio run directory, "
        "checkpoint or model.safetensors before training. true: start the backbone from the "
        "pretrained weights in model_name_or_path (as is_pretrained = true). false/None: neither.")
    cache_dir: str | None = param(None, "Where Hugging Face files are cached and looked up "
                                  "(a hub id not cached there is refused: no downloads).",
                                  policies=HF_BACKBONE)

    @property
    def pretrained_backbone(self) -> bool:
        """Load the backbone's weights from model_name_or_path (is_pretrained or load_pretrain: true)."""
        return self.is_pretrained or self.load_pretrain is True

    @property
    def pretrain_from(self) -> str | None:
        """The run directory / weights file load_pretrain names, or None (true/false/None)."""
        return self.load_pretrain if isinstance(self.load_pretrain, str) and self.load_pretrain else None


@configurable("lora", group="LoRA", breaks_resume=True)
class LoraSettings:
    """peft LoRA adapters around the backbone."""

    enable: bool = param(False, "Wrap the model with peft LoRA adapters.", yaml="lora_enable",
                         policies=VLA_ONLY)
    module: str = param("llm", "Parts that get adapters: comma list of llm, vit, projector, "
                        "action_head, or module-name patterns (on a VLM: its language model, "
                        "vision tower, own projector/connector/merger, the action head).", yaml="lora_module",
                        policies=VLA_ONLY)
    task_type: str = param("CAUSAL_LM", "peft task type.", yaml="lora_task_type", policies=VLA_ONLY)
    r: int = param(64, "LoRA rank (peft LoraConfig.r).", yaml="lora_r", bounds="[1, inf)",
                   policies=VLA_ONLY)
    alpha: int = param(256, "peft LoraConfig.lora_alpha.", yaml="lora_alpha", bounds="[1, inf)",
                       policies=VLA_ONLY)
    dropout: float = param(0.05, "peft LoraConfig.lora_dropout.", yaml="lora_dropout",
                           bounds="[0, 1)", breaks_resume=False, policies=VLA_ONLY)
    bias: str = param("none", "peft LoraConfig.bias.", yaml="lora_bias",
                      choices=("none", "all", "lora_only"), policies=VLA_ONLY)
    weight_path: str | None = param(None, "Existing adapter weights to continue from.",
                                    yaml="lora_weight_path", breaks_resume=False, policies=VLA_ONLY)
    lr: float | None = param(None, "Learning rate of the LoRA parameters (own parameter group); "
                             "None uses --learning_rate.", yaml="lora_lr", bounds="[0, inf)",
                             breaks_resume=False, policies=VLA_ONLY)


@configurable("quantization", group="Quantization", breaks_resume=True)
class QuantizationSettings:
    """bitsandbytes loading of the backbone."""

    enable: bool = param(False, "Load the backbone quantized with bitsandbytes "
                         "(on a VLM: the language model only; vision tower, projector, embedding "
                         "and LM head stay unquantized, in bf16; train it with LoRA: QLoRA).",
                         yaml="use_quantization",
                         policies=VLA_ONLY)
    bits: int = param(4, "4 or 8 (bitsandbytes); 16 loads in bf16/fp16.", choices=(4, 8, 16),
                      policies=VLA_ONLY)
    double_quant: bool = param(True, "Nested quantization of the 4-bit quantization constants.",
                               policies=VLA_ONLY)
    quant_type: str = param("nf4", "4-bit data type.", choices=("nf4", "fp4"), policies=VLA_ONLY)



# The simulator settings of a task (``sim.*``): which scene, and how it is rendered. They live
# in the task's gin file next to ``task.*`` so recording, training and evaluation read one
# source: the recorder renders the dataset with them, ``train.py`` copies them into the run's
# operative_config.gin, and ``python -m ilstudio.eval`` renders the rollouts with exactly the
# settings the policy was trained on. Declared here (not in ilstudio/sim) so resolving a run
# needs nothing from the simulator's package.
SIM_TASKS = ("transfer_cube", "insertion")
# The `language_instruction` each recorded episode carries (language-conditioned policies,
# such as the default LoRA VLA, read it as their prompt).
SIM_INSTRUCTIONS = {
    "transfer_cube": "pick up the red cube with the right arm and hand it to the left arm",
    "insertion": "pick up the peg and the socket and insert the peg into the socket",
}


@configurable("sim", group="Simulation")
class SimSettings:
    """ALOHA scene and rendering settings (bound in gin_configs/tasks/sim_*.gin)."""

    task: str = param("transfer_cube", "The ALOHA scene: 'transfer_cube' or 'insertion'.",
                      choices=SIM_TASKS, documented=False)
    render_height: int = param(480, "Rendered camera frame height in pixels (ACT: 480).",
                               documented=False, bounds="[1, inf)")
    render_width: int = param(640, "Rendered camera frame width in pixels (ACT: 640).",
                              documented=False, bounds="[1, inf)")
    shadows: bool = param(False, "Render shadows (about 4x slower on a CPU renderer).",
                          documented=False)
    multisamples: int = param(0, "Offscreen anti-aliasing samples (the scene's own is 4; "
                              "0 is fastest).", documented=False, bounds="[0, inf)")
    render_mesh_mm: float = param(0.0, "Render-only mesh simplification: vertex clustering on "
                                  "a grid of this many millimetres (0: the scene's meshes as "
                                  "they are). Physics always uses the full meshes. At 2 an "
                                  "ALOHA frame takes ~55% of the CPU time (llvmpipe) and "
                                  "fitted 60x80 frames differ by at most ~21/255 (mean 0.06); "
                                  "record, train and evaluate with one value.", documented=False,
                                  bounds="[0, inf)")
    weld_torquescale: float = param(20.0, "Torque scale of the mocap welds of the end-effector "
                                    "(scripted) scene. MuJoCo 3's default lets the gripper "
                                    "rotate too softly to grasp; 20 reproduces the dynamics "
                                    "ACT's data was recorded with.", documented=False,
                                    bounds="[0, inf)")
    gzip_level: int = param(4, "gzip level of recorded camera frames (0: uncompressed).",
                            documented=False, bounds="[0, 9]")


def images_enabled(task: TaskSettings, dataset: DatasetSettings) -> bool:
    """Whether samples carry camera frames: the one rule (dataset.is_multimodal and at least
    one camera). The data pipeline reads frames exactly when this holds; a policy uses them
    when it also can (``PolicyConfig.image_inputs``)."""
    return dataset.is_multimodal and bool(task.camera_names)



@dataclasses.dataclass
class RunSettings:
    """Every settings object of one run, as gin built them (``resolve.build_settings``).

    What a policy is built from (``build_policy(run)``): training gets it as part of the
    resolved run, evaluation rebuilds it from a run's operative_config.gin. ``policy`` is the
    policy's own settings (its configurable named by model.policy).
    """

    task: TaskSettings
    dataset: DatasetSettings
    model: ModelSettings
    lora: LoraSettings
    quantization: QuantizationSettings
    policy: Any
    sim: SimSettings | None  # None: the task has no simulator

    @property
    def use_images(self) -> bool:
        """Whether the policy gets camera frames (``PolicyConfig.image_inputs``)."""
        return self.policy.image_inputs(self.task, self.dataset)

    def __getitem__(self, name: str) -> Any:
        """``run["task"]``: reads by name, as code written against the older dict form does."""
        if name not in {f.name for f in dataclasses.fields(RunSettings)}:
            raise KeyError(name)
        return getattr(self, name)


STABLE_CONFIGURABLES = ("task", "dataset", "model", "lora", "quantization")


def inert_values(lora: LoraSettings, quantization: QuantizationSettings) -> dict[str, str]:
    """Values their own switch makes inert: gin key -> why (e.g. ``lora.r`` while lora is off).

    Users keep such values in their files and toggle the switch, as in IL-Studio's YAML
    (``lora_r: 64`` beside ``lora_enable: false``): they are kept and recorded in config.gin,
    and reported as one warning, never refused. A value the chosen policy can never honour is
    still an error (the policy's validate decides that, for values not listed here).
    """
    out = {}

    def changed(obj, names, why):
        defaults = {p.name: p.default for p in params_of(type(obj))}
        for name in names:
            if getattr(obj, name) != defaults[name]:
                out[f"{obj.gin_name}.{name}"] = why

    if not lora.enable:
        changed(lora, [p.name for p in params_of(LoraSettings) if p.name != "enable"],
                "lora.enable is False")
    if not quantization.enable:
        changed(quantization, ("bits", "double_quant", "quant_type"), "quantization.enable is False")
    elif quantization.bits != 4:
        changed(quantization, ("double_quant", "quant_type"),
                f"they only apply to 4-bit quantization and quantization.bits = {quantization.bits}")
    return out


def inert_warning(inert: dict[str, str], values: dict[str, object],
                  source_of: Callable[[str], str]) -> str:
    """The one warning listing every inert value with its source and why."""
    lines = [f"  {key} = {values[key]!r} (set in {source_of(key)}): {why}" for key, why in inert.items()]
    return ("these values have no effect in this run because their switch is off (kept in "
            "config.gin; they apply once the switch is on):\n" + "\n".join(lines))
