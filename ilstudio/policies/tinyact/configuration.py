"""TinyACT settings (cheap: no torch): ACT's ideas sized for a CPU.

Why a separate policy rather than a shrunk ACT: on the scripted transfer-cube data the joint
state alone explains almost all of the training loss (the trajectories are smooth), so a small
image policy that also reads the state learns to ignore the camera and reaches the mean cube
position in every episode (see the module doc of ``modeling.py``). TinyACT keeps ACT's action
chunks and temporal ensembling, and adds the levers that make the image matter on a CPU
budget: coordinate channels and spatial-softmax keypoints (where things are, not what they
look like), random-shift augmentation, and state dropout (training samples whose state input
is hidden, so the camera has to explain the whole chunk).
"""

from __future__ import annotations

from ilstudio.config.declare import configurable, param
from ilstudio.policies.base import PolicyConfig, dropout_param
from ilstudio.policies.ensemble import temporal_ensemble_param


@configurable("tinyact", group="TinyACT policy")
class TinyACTConfig(PolicyConfig):
    """Small conv encoder + spatial-softmax keypoints (+ state) -> an action chunk."""

    name = "tinyact"
    uses_images = True
    needs_images = True
    # The evaluation contract (declared in PolicyConfig), ACT's way: query every step and
    # blend the overlapping chunks.
    temporal_ensemble: bool = temporal_ensemble_param(True)
    channels: tuple[int, ...] = param((16, 32, 32), "Conv widths of the image encoder, one "
                                      "3x3 conv (5x5 for the first) per entry.", documented=False,
                                      bounds="[1, inf)")
    strides: tuple[int, ...] = param((2, 2, 1), "Stride of each conv in tinyact.channels.",
                                     documented=False, bounds="[1, inf)")
    keypoints: int = param(32, "Spatial-softmax keypoints per image read off the last conv layer "
                           "(each an expected x, y).", documented=False, bounds="[1, inf)")
    early_keypoints: int = param(16, "Extra keypoints read off the first conv layer's output "
                                 "(fine resolution, colour-level features: a small object is one "
                                 "linear filter away there). 0 disables.", documented=False,
                                 bounds="[0, inf)")
    coord_channels: bool = param(True, "Append x/y coordinate channels to the image (CoordConv), "
                                 "so position is directly visible to the first conv.",
                                 documented=False)
    saturation_channel: bool = param(False, "Append a colour-saturation channel (max - min of "
                                     "R, G, B): coloured objects stand out from a grey/white "
                                     "robot and table before any learning.", documented=False)
    saturation_keypoint: bool = param(False, "Add one keypoint at the spatial softmax of the "
                                      "colour-saturation map (sharpness learned): where the most "
                                      "colourful thing in view is, from the first step of "
                                      "training.", documented=False)
    colour_keypoints: bool = param(False, "Add three keypoints at the spatial softmax of the "
                                   "red-, green- and blue-dominance maps (a channel minus the larger "
                                   "of the other two; sharpness learned): where each coloured "
                                   "object is when there are several (insertion: a red peg and a "
                                   "blue socket, which one saturation keypoint averages).",
                                   documented=False)
    input_norm: bool = param(False, "Standardize the head's input features (keypoints, pooled "
                             "features, state) with an affine map initialized from the first "
                             "training batch (ActNorm): small keypoint motions get unit scale.",
                             documented=False)
    hidden_dim: int = param(512, "Width of the MLP head.", documented=False, bounds="[1, inf)")
    num_layers: int = param(3, "Hidden layers of the MLP head (0: a linear map).",
                            documented=False, bounds="[0, inf)")
    dropout: float = dropout_param(0.0, "Dropout between the head's hidden layers.")
    state_dropout: float = param(0.5, "Training only: probability that a sample's state input is "
                                 "hidden (zeroed, with a 'present' flag), so the image has to "
                                 "explain the chunk. 0 feeds the state always; evaluation always "
                                 "feeds it.", documented=False, bounds="[0, 1]")
    use_state: bool = param(True, "Feed the normalized joint state to the head at all.",
                            documented=False)
    shift: int = param(0, "Training only: random-shift augmentation, in pixels of the fitted "
                       "frame (replicate padding, as DrQ). 0 disables: with a fixed camera a "
                       "shift moves the cube as far as its whole range of positions.",
                       documented=False, bounds="[0, inf)")

    def validate(self, *, task, dataset, model, lora, quantization, source_of) -> None:
        problems = []
        if len(self.channels) != len(self.strides) or not self.channels:
            problems.append(f"tinyact.channels {self.channels} (set in "
                            f"{source_of('tinyact.channels')}) and tinyact.strides {self.strides} "
                            f"(set in {source_of('tinyact.strides')}) must have the same, "
                            f"non-zero length: one stride per conv layer")
        self._validate_with(problems, task=task, dataset=dataset, model=model, lora=lora,
                            quantization=quantization, source_of=source_of)

CONFIG_CLASS = TinyACTConfig
