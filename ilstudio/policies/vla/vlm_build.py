"""Building the VLA policy on a standard image-text-to-text checkpoint (vlm_policy.py)."""

from __future__ import annotations

from ilstudio.errors import UserError
from ilstudio.policies.vla.backbones import Backbone
from ilstudio.policies.vla.parts import keypoint_encoder_trains, trainable_parts, untie_embeddings
from ilstudio.policies.vla.vlm_inputs import ImageTextInputs, bound_pixels, load_processor
from ilstudio.policies.vla.vlm_policy import (
    HFVLAPolicy,
    StateActionHead,
    apply_trainability,
    freeze_unused_vision,
)


def build_hf(backbone: Backbone, *, policy_config, task, dataset, model, lora) -> HFVLAPolicy:
    """The policy on ``backbone``: processor, action head, trainability, LoRA/QLoRA."""
    from ilstudio.models import apply_lora, lora_target_modules

    processor = load_processor(model, backbone.family)
    bound_pixels(processor.image_processor, dataset.image_size)
    inputs = ImageTextInputs(processor, aspect=dataset.image_aspect_ratio,
                             num_images=len(task.camera_names) * dataset.history_images_length)
    vlm = backbone.vlm
    untie_embeddings(vlm)
    embed = vlm.get_input_embeddings()
    if len(inputs.tokenizer) > embed.num_embeddings:
        raise UserError(f"model.model_name_or_path = {model.model_name_or_path!r}: the tokenizer "
                        f"has {len(inputs.tokenizer)} tokens but the model embeds only "
                        f"{embed.num_embeddings}")
    if inputs.tokenizer.pad_token_id is None:
        inputs.tokenizer.pad_token = inputs.tokenizer.eos_token
    head = StateActionHead(embed.embedding_dim, model.chunk_size, task.action_dim, task.state_dim,
                           policy_config.keypoint_encoder, inputs.num_images,
                           policy_config.keypoints_to_head)
    policy = HFVLAPolicy(backbone, inputs, head, prompt_len=policy_config.max_prompt_tokens,
                         llm_loss_weight=model.llm_loss_weight,
                         state_dropout=policy_config.state_dropout)
    apply_trainability(policy, trainable_parts(model))
    freeze_unused_vision(policy)
    if policy_config.instruction:  # evaluation without per-call prompts uses vla.instruction
        from ilstudio.data.language import EpisodeText, LanguageProcessor

        proc = LanguageProcessor(inputs.tokenizer, dataset, policy_config.max_prompt_tokens,
                                 policy_config.max_target_tokens, policy_config.instruction)
        prompt = proc.encode_prompt(proc.prompt_text(EpisodeText(policy_config.instruction), 0))
        policy.set_prompt(prompt["input_ids"], prompt["attention_mask"])
    if lora.enable:  # LoRA (QLoRA on a 4/8-bit language model) on the parts lora.module names
        targets = lora_target_modules(policy.parts(), lora.module, root=policy)
        policy = apply_lora(policy, lora, targets, quantized=backbone.quantized,
                            parts=policy.parts())
        policy.lora_lr = lora.lr
        keypoint_encoder_trains(policy.action_head.keypoint_encoder)
    return policy
