"""How a step runs on its device: precision, memory format, compilation (``model.*`` keys).

``Accel.from_config(cfg.model, device)`` resolves the configuration once per job:

- ``precision``: ``auto`` is bf16 autocast on a GPU that has bf16 and fp32 elsewhere (the
  CPU included); ``fp16`` adds a gradient scaler. Autocast covers the backbone and the
  attention convolution. BAP, the signed square root, the L2 normalisation, the classifier,
  the feature centres and their update always run in fp32 (``WSDAN.forward_head`` turns
  autocast off; see there), so the part features and the centres are the same numbers
  whatever the precision of the convolutions.
- ``channels_last``: NHWC weights and inputs (``None``: on with CUDA, where cuDNN's NHWC
  kernels with bf16 pay; off on the CPU, where it was measured not to).
- ``compile``: ``torch.compile`` of the model (``nn.Module.compile``, in place: the state
  dict keys do not change).
- ``cudnn_benchmark``: let cuDNN pick the fastest convolution algorithms for the (fixed)
  input size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device | str) -> str:
    """``auto`` → ``bf16`` on a CUDA device with bf16 support, else ``fp32``."""
    if name not in PRECISIONS:
        raise ValueError(f"model.precision: {name!r} is not one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


@dataclass
class Accel:
    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = True
    scaler: Any = None  # torch.amp.GradScaler for fp16, else None
    compile_backend: str = "inductor"  # torch.compile backend (tests use a cheaper one)

    @classmethod
    def from_config(cls, model_cfg: Any, device: torch.device | str) -> Accel:
        device = torch.device(device)
        precision = resolve_precision(getattr(model_cfg, "precision", "auto"), device)
        cl = getattr(model_cfg, "channels_last", None)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        return cls(device=device, precision=precision,
                   channels_last=(device.type == "cuda") if cl is None else bool(cl),
                   compile=bool(getattr(model_cfg, "compile", False)),
                   cudnn_benchmark=bool(getattr(model_cfg, "cudnn_benchmark", True)),
                   scaler=scaler)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None for fp32 (no autocast)."""
        return _DTYPES[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for the forward passes (a no-op context for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def inputs(self, images: Tensor) -> Tensor:
        """Images in the memory format the model's weights use."""
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def prepare(self, model: nn.Module) -> nn.Module:
        """Memory format and compilation of a freshly built model (before DDP wraps it),
        and the cuDNN autotuner. Returns the same module."""
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile:
            model.compile(backend=self.compile_backend)
        return model

    def backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients back to their true scale before clipping or measuring them (fp16)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimiser step. With fp16 the scaler skips a step whose gradients overflowed;
        that check reads one flag on the host (the one host sync fp16 costs a step)."""
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def describe(self) -> str:
        parts = [self.precision]
        if self.channels_last:
            parts.append("channels_last")
        if self.compile:
            parts.append("compiled")
        return "+".join(parts)
