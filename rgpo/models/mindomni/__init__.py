"""MindOmni (TencentARC): Qwen2.5-VL -> connector -> OmniGen-v1 decoder -> SDXL VAE, behind rgpo's interface.

- :mod:`.modeling`: the model (chains, the training forward, the pre-norm condition, the image pipeline);
- :mod:`.checkpoint`: the released layout in and out; :mod:`.omnigen`: the decoder's own forward;
- :mod:`.connector`: the connector; :mod:`.options`: typed options and the release's prompts;
- :mod:`.tiny`: tiny and random-shape factories; :mod:`.build_toy_world`: the embedded toy world's builder.
"""

from .modeling import (
    ANSWER_CLOSE,
    BANNED_TOKENS,
    CONDITION_SUFFIX,
    EOS_TOKENS,
    IMAGE_KL_GRID,
    DecoderInputs,
    MindOmni,
    answer_condition_length,
    cat_left_padded,
    condition_attention,
    euler_grid,
    guided_batch,
    pack_left,
)
from .options import INSTRUCTION_PREFIX, NEGATIVE_PROMPT, SYSTEM_PROMPT, MindOmniOptions

__all__ = [
    "ANSWER_CLOSE",
    "BANNED_TOKENS",
    "CONDITION_SUFFIX",
    "EOS_TOKENS",
    "IMAGE_KL_GRID",
    "INSTRUCTION_PREFIX",
    "NEGATIVE_PROMPT",
    "SYSTEM_PROMPT",
    "DecoderInputs",
    "MindOmni",
    "MindOmniOptions",
    "answer_condition_length",
    "cat_left_padded",
    "condition_attention",
    "euler_grid",
    "guided_batch",
    "pack_left",
]
