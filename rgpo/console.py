"""What rgpo prints: the framework messages it knows to be noise are filtered, and a run starts with a summary.

Each filter names the exact message it hides and why it is noise for rgpo's users; anything else still shows.
"""

from __future__ import annotations

import logging
import warnings

# (logger, substring of the message, why it is noise here)
_NOISE = (
    ("transformers.modeling_rope_utils", "original_max_position_embeddings",
     "Phi-3's longrope config as OmniGen-v1 ships it: transformers computes the same factor either way"),
    ("torch.utils.cpp_extension", "No CUDA runtime is found",
     "DeepSpeed probes its CUDA ops on every start; on a CPU machine there is none to find"),
    ("DeepSpeed", "Setting accelerator to CPU", "the CPU is what this machine has"),
)
_WARNINGS = (
    ("`is_gradient_checkpointing` is deprecated", "transformers' own gradient-checkpointing call, not rgpo's"),
    ("The `use_reentrant` parameter", "rgpo passes use_reentrant explicitly"),
    ("torch.utils.checkpoint: the use_reentrant parameter", "rgpo passes use_reentrant explicitly"),
)


class _DropMatching(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_known_noise() -> None:
    """Install the filters (idempotent)."""
    for name, text, _why in _NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMatching(text))
    for text, _why in _WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{text}.*")


def startup_summary(*, family: str, model_path: str | None, train_prompts: int, eval_prompts: int, ranks: int,
                    trainable: int, total: int, start_step: int, max_steps: int, prompts_per_step: int,
                    group: int, images: str, output_dir: str, tracker: str) -> str:
    """The lines a run prints once before its first step."""
    share = 100.0 * trainable / max(total, 1)
    resumed = f" (resuming at step {start_step})" if start_step else ""
    return "\n".join([
        f"[rgpo] model: {family} from {model_path}; trainable {trainable:,} of {total:,} parameters ({share:.2f} %)",
        f"[rgpo] data: {train_prompts} training prompts, {eval_prompts} held-out; {ranks} rank(s)",
        f"[rgpo] steps: {max_steps}{resumed}, each {prompts_per_step} prompts x {group} chains; images: {images}",
        f"[rgpo] output: {output_dir} (checkpoints, metrics.jsonl, config.yaml); tracker: {tracker}",
    ])
