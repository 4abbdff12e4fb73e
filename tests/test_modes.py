"""TrainModeSwitch: the same training flags as ``Module.train``, overrides respected, without the tree walk."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from rgpo.models.mindomni.tiny import build_tiny_mindomni
from rgpo.modes import TrainModeSwitch


def flags(root: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in root.named_modules()}


class KeepsNormFrozen(nn.Module):
    """A common override: train() everywhere except a frozen norm, which must stay in eval."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)

    def train(self, mode: bool = True):
        super().train(mode)
        self.norm.eval()
        return self


@pytest.fixture(scope="module")
def lora_mindomni():
    model = build_tiny_mindomni(seed=0)
    targets = model.lora_targets("language_model")
    model.vlm = get_peft_model(model.vlm, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=targets))
    return model


def test_same_flags_as_module_train_on_mindomni_with_lora(lora_mindomni):
    model = lora_mindomni
    switch = TrainModeSwitch(model)
    assert switch.num_modules == len(list(model.modules()))
    for mode in (False, True, False):
        model.train(not mode)
        switch(mode)
        got = flags(model)
        model.train(mode)
        assert got == flags(model)
        assert set(got.values()) == {mode}


def test_lora_dropout_follows_the_switch(lora_mindomni):
    """The flag is what layers read: in eval the LoRA dropout is off (repeatable outputs), in train it is on."""
    model = lora_mindomni
    switch = TrainModeSwitch(model)
    layer = next(m for name, m in model.named_modules() if name.endswith("q_proj") and hasattr(m, "lora_A"))
    with torch.no_grad():
        for p in layer.lora_B.parameters():
            p.normal_()  # a non-zero adapter, so its dropout shows in the output
        x = torch.randn(3, layer.in_features)
        switch(False)
        assert torch.equal(layer(x), layer(x))
        switch(True)
        torch.manual_seed(0)
        assert not torch.equal(layer(x), layer(x))
    switch(False)


def test_an_overriding_module_keeps_its_own_train():
    root = nn.Sequential(nn.Linear(4, 4), KeepsNormFrozen(), nn.Dropout(0.1))
    switch = TrainModeSwitch(root)
    root.eval()
    switch(True)
    got = flags(root)
    root.eval()
    root.train(True)
    assert got == flags(root)
    assert got["1.norm"] is False and got["1.proj"] is True and got["2"] is True


def test_kernels_on_falls_back_to_module_train(lora_mindomni, monkeypatch):
    model = lora_mindomni
    switch = TrainModeSwitch(model)
    calls = []
    monkeypatch.setattr(model, "train", lambda mode=True: calls.append(mode) or model)
    hf = model.hf_vlm()
    monkeypatch.setattr(hf, "_use_kernels", True, raising=False)
    switch(True)
    assert calls == [True]


def test_rejects_a_non_bool_mode():
    with pytest.raises(ValueError, match="boolean"):
        TrainModeSwitch(nn.Linear(2, 2))("eval")
