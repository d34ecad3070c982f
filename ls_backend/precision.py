"""Numeric precision for inference and training, per device.

Inference (``INFERENCE_PRECISION``):

* ``auto`` (default): on CUDA, bf16 autocast where the card supports bf16, else fp16
  autocast; on a CPU with native bf16 instructions (``avx512_bf16`` or ``amx_bf16``), a
  bf16 copy of the encoder's weights; on any other CPU, float32.
* ``float32``, ``bfloat16``, ``float16``: forced (``float16`` only on CUDA).

Training always keeps float32 master weights: on CUDA with bf16 autocast, or fp16
autocast with a gradient scaler where bf16 is missing; on a CPU, plain float32.

Measured with the bundled encoder on a 2-core CPU with ``avx512_bf16`` (``bench/predict.py``,
run with ``INFERENCE_PRECISION`` unset and ``=float32``): 180 against 116 tasks/s in one
``/predict`` of 1,000 AG News texts, zero-shot accuracy 0.631 against 0.632.  On real sentences
bf16 embeddings stay within a cosine of 0.999 of float32's (``tests/test_precision.py``).
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

CHOICES = ("auto", "float32", "bfloat16", "float16")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cuda_supports_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def inference_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype inference runs in on ``device`` for an ``INFERENCE_PRECISION`` value."""
    if setting not in CHOICES:
        raise ValueError(f"INFERENCE_PRECISION must be one of {', '.join(CHOICES)}, not {setting!r}")
    if setting == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if cuda_supports_bf16() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    dtype = _DTYPES[setting]
    if dtype is torch.float16 and device.type != "cuda":
        raise ValueError("INFERENCE_PRECISION=float16 needs a CUDA device; use bfloat16 or float32 on a CPU")
    return dtype


def training_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype of training steps: bf16 or fp16 on CUDA, float32 on a CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if cuda_supports_bf16() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` on CUDA; nothing elsewhere (a CPU runs the weights' own dtype)."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, dtype: torch.dtype) -> "torch.amp.GradScaler":
    """A gradient scaler, enabled only for fp16 autocast (bf16 and float32 need none)."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and dtype is torch.float16)


def cap_gpu_memory(device: torch.device, fraction: float) -> bool:
    """Limit this process's CUDA caching allocator to ``fraction`` of the card (0: no cap), so a
    training job can share a GPU with web workers; allocations past it raise ``OutOfMemoryError``.
    Returns whether a cap was set."""
    if device.type != "cuda" or not fraction or not torch.cuda.is_available():
        return False
    torch.cuda.set_per_process_memory_fraction(float(fraction), device.index if device.index is not None else 0)
    return True


def short_name(dtype: torch.dtype) -> str:
    return _SHORT.get(dtype, str(dtype).replace("torch.", ""))


class TrainingStep:
    """One optimiser step in the training dtype of ``device``: backward (through a gradient
    scaler under fp16), gradient clipping to ``max_norm``, then the optimiser's step.
    Use ``with step.autocast():`` around the forward pass."""

    def __init__(self, device: torch.device, optimizer: torch.optim.Optimizer, parameters, max_norm: float = 1.0):
        self.device = device
        self.dtype = training_dtype(device)
        self.optimizer = optimizer
        self.parameters = list(parameters)
        self.max_norm = max_norm
        self.scaler = grad_scaler(device, self.dtype)

    def autocast(self):
        return autocast(self.device, self.dtype)

    def __call__(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.parameters, self.max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
