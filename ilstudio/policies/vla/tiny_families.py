"""Tiny random checkpoints of real vision-language families, written offline.

``write_tiny_vlm(DIR, family)`` writes a standard Hugging Face image-text-to-text checkpoint
(config.json + model.safetensors, tokenizer, image processor, processor config, chat
template where the family has one) that ``AutoModelForImageTextToText.from_pretrained(DIR)``
loads without ilstudio, and ``AutoProcessor.from_pretrained(DIR)`` too where the family's
processor can be built here (Qwen2-VL's always holds a video processor, which needs
torchvision: its tokenizer and image processor load on their own).

The tokenizer is a byte-level BPE trained here with the ``tokenizers`` library on a few
robot sentences; it carries every special token the family's processor needs, and the
config's token ids are the tokenizer's. Sizes are a few hundred KB; seeded.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "idefics3", "paligemma", "llava")

_CORPUS = (
    "pick up the cube and transfer it to the other arm",
    "follow the wave with both arms",
    "previous subtask: none. subtask: reach. reasoning: the arm is rising so I reach",
    "subtask: grasp lift place release. reasoning: the arm is falling so I grasp",
    "move the gripper to the left, then to the right, and stop",
    "user assistant system you are a helpful robot",
)

# Chat templates in the families' own formats (shortened: no tools, no video branches).
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}{{ ': ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}"
    "{% endif %}{% endfor %}{% for c in message['content'] %}{% if c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{{ ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def _tokenizer(specials: list[str], named: dict[str, str], template: str | None, vocab: int = 400):
    """A byte-level BPE PreTrainedTokenizerFast with ``specials`` as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(_CORPUS) * 4, trainer)
    extra = [s for s in specials if s not in named.values()]
    out = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=extra, **named)
    if template:
        out.chat_template = template
    return out


def _text(hidden: int, vocab: int, tok, tie: bool = False, **kw) -> dict:
    # Tied where the family's small checkpoints tie (Qwen2-VL-2B, PaliGemma), so the policy's
    # untying (safetensors checkpoints hold no shared tensors) is exercised.
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                tie_word_embeddings=tie, **kw)


def _qwen(family: str):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen2VLImageProcessor

    tok = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                      "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                     {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}, _QWEN_TEMPLATE)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = _text(64, len(tok), tok, tie=family == "qwen2_vl", rope_parameters=rope)
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                      patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=64, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    image = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64})
    return cfg, tok, image, None  # the processor needs torchvision (a video processor)


def _idefics3():
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tok = _tokenizer(["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>",
                      "<fake_token_around_image>", "<global-img>", *grid],
                     {"pad_token": "<|endoftext|>", "eos_token": "<end_of_utterance>",
                      "bos_token": "<|im_start|>"}, _IDEFICS3_TEMPLATE)
    size, patch, scale = 32, 8, 2
    seq = (size // patch) ** 2 // scale ** 2
    image = Idefics3ImageProcessor(size={"longest_edge": size}, max_image_size={"longest_edge": size},
                                   do_image_splitting=False)
    proc = Idefics3Processor(image_processor=image, tokenizer=tok, image_seq_len=seq,
                             chat_template=_IDEFICS3_TEMPLATE)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=size, patch_size=patch)
    cfg = Idefics3Config(vision_config=vision, text_config=_text(64, len(tok), tok, model_type="llama"),
                         scale_factor=scale, image_token_id=tok.convert_tokens_to_ids("<image>"))
    return cfg, tok, image, proc


def _paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessor

    tok = _tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
                     {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>",
                      "unk_token": "<unk>"}, None)
    size, patch = 32, 8
    image = SiglipImageProcessor(size={"height": size, "width": size})
    image.image_seq_length = (size // patch) ** 2
    proc = PaliGemmaProcessor(image_processor=image, tokenizer=tok)  # adds 1,152 loc/seg tokens
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=size, patch_size=patch, projection_dim=64)
    text = _text(64, len(tok), tok, tie=True, model_type="gemma", head_dim=16)
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=64,
                          tie_word_embeddings=True,
                          image_token_id=tok.convert_tokens_to_ids("<image>"))
    return cfg, tok, image, proc


def _llava():
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor

    tok = _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"],
                     {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>",
                      "unk_token": "<unk>"}, _LLAVA_TEMPLATE)
    size, patch = 32, 8
    image = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    proc = LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=_LLAVA_TEMPLATE)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=size, patch_size=patch, projection_dim=32)
    cfg = LlavaConfig(vision_config={**vision, "model_type": "clip_vision_model"},
                      text_config=_text(64, len(tok), tok, model_type="llama"),
                      image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    return cfg, tok, image, proc


def write_tiny_vlm(output_dir: str | Path, family: str, *, seed: int = 0) -> Path:
    """Write a tiny random ``family`` checkpoint to ``output_dir`` (atomic; replaces one there)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from ilstudio.rundir import atomic_dir

    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: expected one of {', '.join(FAMILIES)}")
    out = Path(output_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise FileExistsError(f"{out} exists and is not a checkpoint directory; refusing to replace it")
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    maker = {"qwen2_vl": lambda: _qwen("qwen2_vl"), "qwen2_5_vl": lambda: _qwen("qwen2_5_vl"),
             "idefics3": _idefics3, "paligemma": _paligemma, "llava": _llava}[family]
    with atomic_dir(out, replace=True) as tmp, torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg, tok, image, proc = maker()
        model = AutoModelForImageTextToText.from_config(cfg)
        model.save_pretrained(tmp)
        if proc is not None:
            proc.save_pretrained(tmp)
        else:
            tok.save_pretrained(tmp)
            image.save_pretrained(tmp)
            (tmp / "chat_template.jinja").write_text(tok.chat_template)
    return out
