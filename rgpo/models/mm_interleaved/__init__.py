"""MM-Interleaved (OpenGVLab): Vicuna-13B + CLIP ViT-L/14 ViT-Adapter + feature synchronizers + SD-2.1 UNet, with
interleaved text-and-image chains.

- :mod:`.modeling`: the model (chains, interleaved rollouts, the training forward with every image in place, the
  decoder condition, the guided UNet); :mod:`.llm`, :mod:`.vision`, :mod:`.unet`: its parts; :mod:`.deform`: the
  multi-scale deformable attention and the synchronizer in pure PyTorch;
- :mod:`.checkpoint`: the released layout in and out; :mod:`.options`: typed options and the prompt;
- :mod:`.tiny`: tiny and random-shape factories, and the tiny writer of the released layout.
"""

from .deform import MMFS, MSDeformAttn, ms_deform_attn
from .modeling import InterleavedCondition, MMInterleaved, UNetInputs
from .options import SYSTEM_PROMPT, MMInterleavedOptions

__all__ = ["MMFS", "SYSTEM_PROMPT", "InterleavedCondition", "MMInterleaved", "MMInterleavedOptions",
           "MSDeformAttn", "UNetInputs", "ms_deform_attn"]
