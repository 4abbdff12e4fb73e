"""Switching a fixed module tree between train and eval mode without walking it every time.

``nn.Module.train(mode)`` recurses through every submodule and sets ``training`` through ``Module.__setattr__``:
about 2 us a module, so about 1 ms a call on the 480-module tiny MindOmni. The trainer switches twice a step
(eval for the rollout, train for the update), which on a small model is a visible share of the step.
:class:`TrainModeSwitch` flattens the tree once and then sets the flag directly.
"""

from __future__ import annotations

from torch import nn


def _pretrained_train():
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return PreTrainedModel.train


class TrainModeSwitch:
    """``root.train(mode)`` for a module tree whose structure no longer changes (build it after every adapter
    and wrapper is in place; the trainer builds it after ``deepspeed.initialize``).

    Modules that inherit ``nn.Module.train`` get ``training`` set directly (what ``nn.Module.train`` does for a
    bool). A module whose class overrides ``train`` keeps its override: it is called, and its subtree left to it.
    One override is known and replayed instead: transformers' ``PreTrainedModel.train`` only adds a kernel
    re-registration when ``use_kernels`` is on, so while no such model has it on, it is treated as the plain
    one; when one has, the whole tree goes through ``root.train(mode)``.
    """

    def __init__(self, root: nn.Module):
        self.root = root
        pretrained_train = _pretrained_train()
        self._plain: list[nn.Module] = []  # training flag set directly
        self._custom: list[nn.Module] = []  # own train() called (it handles its subtree)
        self._pretrained: list[nn.Module] = []  # PreTrainedModel.train: plain unless use_kernels
        seen: set[int] = set()
        stack = [root]
        while stack:
            module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            train = type(module).train
            if train is nn.Module.train or (pretrained_train is not None and train is pretrained_train):
                self._plain.append(module)
                if train is not nn.Module.train:
                    self._pretrained.append(module)
                stack.extend(module.children())
            else:
                self._custom.append(module)

    @property
    def num_modules(self) -> int:
        return len(self._plain) + len(self._custom)

    def __call__(self, mode: bool = True) -> None:
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be boolean, got {mode!r}")
        if any(getattr(m, "use_kernels", False) for m in self._pretrained):
            self.root.train(mode)
            return
        set_flag = object.__setattr__  # Module.__setattr__ does the same for a bool, after several checks
        for module in self._plain:
            set_flag(module, "training", mode)
        for module in self._custom:
            module.train(mode)

