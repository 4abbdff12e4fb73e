"""MindOmni's connector: ``Linear(vlm_hidden -> dec_hidden)`` then two Phi-3 decoder layers, no final norm.

The Phi-3 layers use the decoder's own Phi-3 config (MindOmni builds them from OmniGen's config), a causal mask
and position ids 0..L-1 counted from each row's first real token (rows are left-padded).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Phi3Config
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer, Phi3RotaryEmbedding


def phi3_config_from_dict(values: dict) -> Phi3Config:
    """A ``Phi3Config`` from an OmniGen-v1 style ``config.json`` dict, attention through torch SDPA.

    OmniGen-v1 stores ``rope_scaling = {"type": "su", ...}`` with ``original_max_position_embeddings`` at the top
    level; transformers 5 renames "su" to "longrope" only AFTER copying that length into the rope parameters, so
    the raw dict fails validation. Normalising it first loads the same configuration.
    """
    values = {k: v for k, v in values.items() if k not in ("architectures", "transformers_version")}
    rope = dict(values.pop("rope_scaling", None) or values.pop("rope_parameters", None) or {})
    if rope:
        kind = rope.pop("type", None) or rope.get("rope_type", "default")
        rope["rope_type"] = "longrope" if kind == "su" else kind
        if rope["rope_type"] == "longrope":
            rope.setdefault(
                "original_max_position_embeddings", values.get("original_max_position_embeddings", 4096)
            )
        values["rope_parameters"] = rope
    config = Phi3Config(**values)
    config._attn_implementation = "sdpa"
    return config


class MindOmniConnector(nn.Module):
    """VLM states (N, L, H_vlm) -> decoder condition embeddings (N, L, D).

    Checkpoint keys (``connector.safetensors``) are ``0.*`` for the projection and ``1.*``, ``2.*`` for the
    layers; :meth:`released_state_dict` / :meth:`load_released_state_dict` convert.
    """

    def __init__(self, in_features: int, config: Phi3Config, num_layers: int = 2):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(in_features, config.hidden_size)
        self.layers = nn.ModuleList([Phi3DecoderLayer(config, i) for i in range(num_layers)])
        self.rotary_emb = Phi3RotaryEmbedding(config)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """states (N, L, H_vlm), mask (N, L) left-padded -> (N, L, D). Pad rows hold finite, unused values."""
        hidden = self.proj(states.to(self.proj.weight.dtype))
        real = mask.bool()
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        length = mask.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        allowed = causal[None] & real[:, None, :]
        # A pad query would see no key at all (NaN softmax); let it see everything, nothing reads it.
        allowed = allowed | ~real[:, :, None]
        bias = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        bias = bias.masked_fill(~allowed, torch.finfo(hidden.dtype).min)[:, None]  # (N, 1, L, L)
        position_embeddings = self.rotary_emb(hidden, positions)
        for layer in self.layers:
            hidden = layer(
                hidden, attention_mask=bias, position_ids=positions, position_embeddings=position_embeddings
            )
        return hidden

    def released_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with MindOmni's key names (``0.weight``, ``1.self_attn.qkv_proj.weight``, ...)."""
        out = {f"0.{k}": v for k, v in self.proj.state_dict().items()}
        for i, layer in enumerate(self.layers):
            out.update({f"{i + 1}.{k}": v for k, v in layer.state_dict().items()})
        return out

    def load_released_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load MindOmni's ``connector.safetensors`` keys; missing or unexpected keys are an error."""
        mapped = {}
        for key, value in state.items():
            index, _, rest = key.partition(".")
            if not index.isdigit() or int(index) > len(self.layers):
                raise KeyError(
                    f"unexpected connector key {key!r}: expected 0.* (projection) or 1..{len(self.layers)}.*"
                )
            mapped[("proj." if index == "0" else f"layers.{int(index) - 1}.") + rest] = value
        self.load_state_dict(mapped, strict=True)
