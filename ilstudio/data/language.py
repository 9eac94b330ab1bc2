"""Episode text -> token tensors for language-conditioned policies (the VLA).

Where the text lives in an ACT HDF5 episode::

    attrs["language_instruction"]   str          the task instruction (one per episode)
    /language/subtask               (T,) str     optional: the subtask being done at step t
    /language/reasoning             (T,) str     optional: why the robot does what it does at t

What one sample (episode, t) becomes, all fixed-length so the default collator stacks them:

    input_ids       (P + T,) int64   P = prompt part, left-padded; T = target part, right-padded
    attention_mask  (P + T,) int64   0 on padding
    labels          (P + T,) int64   -100 on every prompt position and on padding

* prompt  = instruction [+ " previous subtask: <s'>" with dataset.use_prev_subtask, where s'
  is the last subtask before t that differs from the subtask at t, "none" at the start]
* target  = [" subtask: " <subtask at t>]   when the episode has /language/subtask
            [" reasoning: " <reasoning at t>] with dataset.use_reasoning
            followed by the tokenizer's eos token; empty (all labels -100) if neither applies.
  The marker words (" subtask: ", " reasoning: ") and eos are template tokens; the subtask and
  reasoning texts are the *segments*.
* labels  = the target token ids; with dataset.select_seg_token_mask only the segment tokens
  keep their ids and the template tokens become -100 too.

Each piece is tokenized on its own (no special tokens) and concatenated, so segment
boundaries are exact token positions. ``dataset.lazy_preprocess`` true tokenizes when a
sample is drawn; false tokenizes every (episode, t) once when the dataset is built and
serves cached arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from absl import logging

from ilstudio.data.episodes import INSTRUCTION_ATTR, TEXT_KEYS, episode_ref
from ilstudio.data.source import EpisodeRef, read_errors
from ilstudio.errors import UserError

SUBTASK_KEY = TEXT_KEYS["subtask"]  # as messages name them (the HDF5 layout above)
REASONING_KEY = TEXT_KEYS["reasoning"]
IGNORE = -100
SUBTASK_MARK = " subtask: "
REASONING_MARK = " reasoning: "
PREV_MARK = " previous subtask: "


@dataclass(frozen=True)
class EpisodeText:
    """The text of one episode (per-step lists have one string per step, or are None)."""

    instruction: str
    subtask: tuple[str, ...] | None = None
    reasoning: tuple[str, ...] | None = None

    def previous_subtask(self, t: int) -> str:
        """The last subtask before t that differs from the one at t ('none' if there is none)."""
        if self.subtask is None:
            return "none"
        current = self.subtask[t]
        for s in reversed(self.subtask[:t]):
            if s != current:
                return s
        return "none"


def read_episode_text(path: str | Path | EpisodeRef, steps: int, default_instruction: str = "") -> EpisodeText:
    """Read an episode's instruction and per-step texts (missing per-step texts -> None).

    path: an episode reference of any format (a bare path: HDF5); a LeRobot episode's task
    string is its instruction.
    """
    ref = episode_ref(path)
    with ref.open() as src, read_errors(ref):
        instruction = src.instruction
        if instruction is None:
            instruction = default_instruction
        if not instruction:
            raise UserError(f"{ref.name}: no root attribute '{INSTRUCTION_ATTR}' and no "
                            f"vla.instruction to fall back on; a language-conditioned policy needs "
                            f"a task instruction (write the attribute, or bind vla.instruction)")
        return EpisodeText(str(instruction), src.step_texts("subtask", steps),
                           src.step_texts("reasoning", steps))


class LanguageProcessor:
    """Tokenizes one step's texts into the fixed-length tensors described above.

    tokenizer: a Hugging Face tokenizer with pad and eos tokens.
    needs_target: refuse data that gives no language target (a language loss would be 0).
    settings: the DatasetSettings (use_reasoning, use_prev_subtask, select_seg_token_mask,
        lazy_preprocess).
    """

    def __init__(self, tokenizer, settings, max_prompt_tokens: int, max_target_tokens: int,
                 default_instruction: str = "", needs_target: bool = False) -> None:
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise UserError("the backbone's tokenizer needs a pad token and an eos token")
        self.tokenizer = tokenizer
        self.settings = settings
        self.prompt_len = max_prompt_tokens
        self.target_len = max_target_tokens
        self.default_instruction = default_instruction
        self.needs_target = needs_target  # a language loss is on: the data must give it a target
        self.encode_calls = 0  # how many samples were tokenized (tests check eager vs lazy)
        self._warned = False

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_text(self, text: EpisodeText, t: int) -> str:
        prompt = text.instruction
        if self.settings.use_prev_subtask:
            prompt += PREV_MARK + text.previous_subtask(t)
        return prompt

    def target_pieces(self, text: EpisodeText, t: int) -> list[tuple[str, bool]]:
        """(piece, is_segment) pairs of the language target at t (eos added by encode)."""
        pieces: list[tuple[str, bool]] = []
        if text.subtask is not None:
            pieces += [(SUBTASK_MARK, False), (text.subtask[t], True)]
        if self.settings.use_reasoning and text.reasoning is not None:
            pieces += [(REASONING_MARK, False), (text.reasoning[t], True)]
        return pieces

    def encode_prompt(self, prompt: str) -> dict[str, torch.Tensor]:
        """Prompt-only tensors (P,) for inference: input_ids, attention_mask."""
        ids = self._ids(prompt)
        if len(ids) > self.prompt_len:
            self._warn(f"prompt of {len(ids)} tokens cut to vla.max_prompt_tokens = {self.prompt_len}")
            ids = ids[:self.prompt_len]
        pad = self.prompt_len - len(ids)
        return {"input_ids": torch.tensor([self.tokenizer.pad_token_id] * pad + ids),
                "attention_mask": torch.tensor([0] * pad + [1] * len(ids))}

    def encode(self, text: EpisodeText, t: int) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, labels for step t (each (P + T,) int64)."""
        self.encode_calls += 1
        prompt = self.encode_prompt(self.prompt_text(text, t))
        ids: list[int] = []
        labels: list[int] = []
        pieces = self.target_pieces(text, t)
        for piece, is_segment in pieces:
            piece_ids = self._ids(piece)
            ids += piece_ids
            keep = is_segment or not self.settings.select_seg_token_mask
            labels += piece_ids if keep else [IGNORE] * len(piece_ids)
        if pieces:
            eos = self.tokenizer.eos_token_id
            ids.append(eos)
            labels.append(IGNORE if self.settings.select_seg_token_mask else eos)
        if len(ids) > self.target_len:
            self._warn(f"language target of {len(ids)} tokens cut to vla.max_target_tokens = "
                       f"{self.target_len}")
            ids, labels = ids[:self.target_len], labels[:self.target_len]
        pad = self.target_len - len(ids)
        target_ids = torch.tensor(ids + [self.tokenizer.pad_token_id] * pad, dtype=torch.long)
        target_mask = torch.tensor([1] * len(ids) + [0] * pad, dtype=torch.long)
        target_labels = torch.tensor(labels + [IGNORE] * pad, dtype=torch.long)
        return {
            "input_ids": torch.cat([prompt["input_ids"].long(), target_ids]),
            "attention_mask": torch.cat([prompt["attention_mask"].long(), target_mask]),
            "labels": torch.cat([torch.full((self.prompt_len,), IGNORE), target_labels]),
        }

    def _warn(self, message: str) -> None:
        if not self._warned:
            logging.warning("%s (further cuts are not reported)", message)
            self._warned = True

    def for_episodes(self, paths: Sequence[str | Path | EpisodeRef], lengths: Sequence[int]) -> EpisodeLanguage:
        """Bind to a dataset's episodes (reads their text now; tokenizes now if not lazy)."""
        texts = [read_episode_text(p, int(n), self.default_instruction)
                 for p, n in zip(paths, lengths, strict=True)]
        for key, wanted, have in (
                ("use_reasoning", self.settings.use_reasoning, lambda x: x.reasoning is not None),
                ("use_prev_subtask", self.settings.use_prev_subtask, lambda x: x.subtask is not None)):
            missing = [episode_ref(p).name for p, x in zip(paths, texts, strict=True) if not have(x)]
            if wanted and missing:
                what = REASONING_KEY if key == "use_reasoning" else SUBTASK_KEY
                raise UserError(f"dataset.{key} = True, but {len(missing)} episode(s) have no "
                                f"/{what} (first: {missing[0]}); set dataset.{key} = False or add "
                                f"the text to the data")
        if self.needs_target and not any(self.target_pieces(x, 0) for x in texts):
            raise UserError(f"model.llm_loss_weight > 0, but no episode has a language target: "
                            f"none has /{SUBTASK_KEY}, and /{REASONING_KEY} counts only with "
                            f"dataset.use_reasoning = True (first episode: {episode_ref(paths[0]).name})")
        return EpisodeLanguage(self, texts, [int(n) for n in lengths],
                               eager=not self.settings.lazy_preprocess)


class EpisodeLanguage:
    """The language tensors of one dataset's episodes: tokenized on demand or all up front."""

    def __init__(self, processor: LanguageProcessor, texts: list[EpisodeText], lengths: list[int],
                 eager: bool) -> None:
        self.processor, self.texts = processor, texts
        self._cache: list[dict[str, np.ndarray]] | None = None
        if eager:
            self._cache = []
            for text, n in zip(texts, lengths, strict=True):
                steps = [processor.encode(text, t) for t in range(n)]
                self._cache.append({k: torch.stack([s[k] for s in steps]).numpy() for k in steps[0]})

    def __call__(self, ep: int, t: int) -> dict[str, torch.Tensor]:
        if self._cache is not None:
            return {k: torch.from_numpy(v[t].copy()) for k, v in self._cache[ep].items()}
        return self.processor.encode(self.texts[ep], t)
