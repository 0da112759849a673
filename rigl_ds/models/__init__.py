"""Model builders: torchvision ResNet-50 (v1.5) and ResNet-18, small nets for small images, user builders."""
from __future__ import annotations

import importlib
from typing import Any

import torch
import torchvision
from torch import nn

from rigl_ds.config import MODELS, ModelSection


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks and two linear layers, for small images (8x8 digits, 32x32 CIFAR)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, hidden: int = 256) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * 4, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """A 3-layer perceptron on flattened inputs."""

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _user_builder(spec: str) -> Any:
    module_name, _, fn_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model.name {spec!r}: cannot import module {module_name!r}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"model.name {spec!r}: module {module_name!r} has no callable {fn_name!r}")
    return fn


def build_model(cfg: ModelSection, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """Build the model named by ``cfg.name`` for ``num_classes`` (a language model: the vocabulary)
    and inputs of ``input_shape`` ((C, H, W) images, or (seq_len,) token ids for ``gpt``)."""
    kwargs = dict(cfg.kwargs)
    if cfg.name == "gpt":
        from .gpt import GPT

        try:
            return GPT(vocab=num_classes, context=input_shape[0], **kwargs)
        except TypeError as e:
            raise ValueError(f"model.kwargs for gpt: {e} (allowed: n_layer, n_head, d_model, dropout)") from None
    c, h, w = input_shape
    if cfg.name == "small_cnn":
        model: nn.Module = SmallCNN(num_classes=num_classes, in_channels=c, **kwargs)
    elif cfg.name == "mlp":
        model = MLP(num_classes=num_classes, in_features=c * h * w, **kwargs)
    elif cfg.name in ("resnet18", "resnet50"):
        # torchvision's ResNet-50 puts the stride in the 3x3 conv: NVIDIA's "v1.5".
        ctor = getattr(torchvision.models, cfg.name)
        model = ctor(weights=None, num_classes=num_classes, zero_init_residual=cfg.zero_init_residual, **kwargs)
        if c != 3:
            model.conv1 = nn.Conv2d(c, 64, kernel_size=7, stride=2, padding=3, bias=False)
    elif ":" in cfg.name:
        model = _user_builder(cfg.name)(num_classes=num_classes, **kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model.name {cfg.name!r} returned {type(model).__name__}, not an nn.Module")
    else:  # the schema already refuses this
        raise ValueError(f"unknown model {cfg.name!r}; allowed: {', '.join(MODELS)}, or 'module:function'")
    if cfg.init == "kaiming_fan_in":
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.weight.device.type != "meta":
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    return model
