"""The WS-DAN network (Hu et al. 2019, §3): backbone → attention maps → BAP → classifier.

``forward`` is deterministic: it draws no random numbers. The attention-guided augmentation
(cropping, dropping) lives in the training step (``wsdan.train_step``), and the refinement
at test time in ``wsdan.inference``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from wsdan.backbones import Backbone, build_backbone
from wsdan.bap import SQRT_GRAD_EPS, bilinear_attention_pool

#: Logit temperature for the L2-normalised part features (docs/algorithm.md §1.4). With a unit
#: norm input and a plain linear layer the logits would be tiny and the softmax almost
#: flat; the public codes multiply by 100, and removing it stalls training.
LOGIT_SCALE = 100.0


class WSDANOutput(NamedTuple):
    logits: Tensor  # B×K
    features: Tensor  # B×(M·C) part features P (signed sqrt, L2-normalised)
    attention_maps: Tensor  # B×M×h×w, non-negative


class WSDAN(nn.Module):
    """WS-DAN classifier.

    Args:
        backbone: a :class:`wsdan.backbones.Backbone` (takes [0, 1] images, normalises itself).
        num_classes: K (≥ 2).
        num_attentions: M, number of attention maps (paper default 32).
        logit_scale: s in logits = W(s·P).
        sqrt_grad_eps: backward epsilon of the signed square root (``None``: exact,
            unbounded derivative; see ``wsdan.bap.SQRT_GRAD_EPS``).

    Buffers:
        feature_centers: K×(M·C) class feature centres (docs/algorithm.md §2), zeros at start,
            saved in ``state_dict``, changed only by ``wsdan.centers.update_centers_``.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        num_attentions: int = 32,
        logit_scale: float = LOGIT_SCALE,
        sqrt_grad_eps: float | None = SQRT_GRAD_EPS,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if num_attentions < 1:
            raise ValueError(f"num_attentions must be >= 1, got {num_attentions}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_attentions = num_attentions
        self.logit_scale = float(logit_scale)
        self.sqrt_grad_eps = sqrt_grad_eps
        c = backbone.out_channels
        self.num_features = num_attentions * c
        # A = ReLU(BN(Conv1×1(F))): non-negative by construction (docs/algorithm.md §1.2).
        self.attention = nn.Sequential(
            nn.Conv2d(c, num_attentions, kernel_size=1, bias=False),
            nn.BatchNorm2d(num_attentions, eps=1e-3),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(self.num_features, num_classes, bias=False)
        self.register_buffer("feature_centers", torch.zeros(num_classes, self.num_features))

    @property
    def input_mean(self) -> Tensor:
        """Per-channel mean of the backbone's normalisation ([0, 1] scale), 3 values."""
        return self.backbone.mean

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters that are not part of the (possibly pretrained) backbone."""
        return [*self.attention.parameters(), *self.classifier.parameters()]

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: B×3×H×W in [0, 1] → (F B×C×h×w, A B×M×h×w)."""
        feats = self.backbone(x)  # B×C×h×w
        attn = self.attention(feats)  # B×M×h×w
        return feats, attn

    def forward_head(self, feats: Tensor, attn: Tensor) -> tuple[Tensor, Tensor]:
        """(F, A) → (logits B×K, part features B×(M·C)), always in fp32.

        Under autocast (``model.precision`` bf16/fp16) the backbone and the attention
        convolution run in half precision, but BAP, the signed square root (whose slope is
        steep near zero), the L2 normalisation and the classifier run in fp32 here, with
        autocast off: the part features P, which the feature centres are built from and
        compared with, are then the fp32 computation on the (half-precision) maps.
        """
        with torch.autocast(feats.device.type, enabled=False):
            parts = bilinear_attention_pool(feats.float(), attn.float(),
                                            grad_eps=self.sqrt_grad_eps)  # B×(M·C)
            logits = self.classifier(parts * self.logit_scale)  # B×K
        return logits, parts

    def forward(self, x: Tensor) -> WSDANOutput:
        feats, attn = self.forward_features(x)
        logits, parts = self.forward_head(feats, attn)
        return WSDANOutput(logits, parts, attn.float())


def build_model(
    backbone: str = "inception_v3",
    *,
    num_classes: int,
    num_attentions: int = 32,
    logit_scale: float = LOGIT_SCALE,
    pretrained: bool = False,
    weights: str | None = None,
    sqrt_grad_eps: float | None = SQRT_GRAD_EPS,
) -> WSDAN:
    """Build a WS-DAN model on a registered backbone (``wsdan.backbones.list_backbones()``).

    ``pretrained=True`` takes torchvision's weights from the local cache (``TORCH_HOME``);
    ``weights=`` loads a backbone state dict from a local path or ``s3://`` URI, strictly.
    """
    bb = build_backbone(backbone, pretrained=pretrained, weights=weights)
    return WSDAN(
        bb,
        num_classes=num_classes,
        num_attentions=num_attentions,
        logit_scale=logit_scale,
        sqrt_grad_eps=sqrt_grad_eps,
    )
