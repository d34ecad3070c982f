"""Inference precision: how ``INFERENCE_PRECISION`` resolves per device, what a bf16 encoder
serves on a CPU (the same answers as float32 on real sentences), and training staying float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ls_backend import precision
from ls_backend.model import Encoder
from ls_backend.settings import Settings, SettingsError, bundled_encoder_path

from .support.data import AGNEWS_LABELS, agnews

CPU = torch.device("cpu")


def test_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"sse2", "avx512f", "avx512_bf16"}))
    assert precision.inference_dtype("auto", CPU) is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"sse2", "amx_bf16"}))
    assert precision.inference_dtype("auto", CPU) is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"sse2", "avx2", "avx512f"}))
    assert precision.inference_dtype("auto", CPU) is torch.float32  # no native bf16: emulation is slower
    assert precision.inference_dtype("bfloat16", CPU) is torch.bfloat16  # forced
    assert precision.inference_dtype("float32", CPU) is torch.float32


def test_auto_on_cuda_falls_back_to_fp16_where_bf16_is_missing(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(precision, "cuda_supports_bf16", lambda: True)
    assert precision.inference_dtype("auto", cuda) is torch.bfloat16
    assert precision.training_dtype(cuda) is torch.bfloat16
    monkeypatch.setattr(precision, "cuda_supports_bf16", lambda: False)
    assert precision.inference_dtype("auto", cuda) is torch.float16
    assert precision.training_dtype(cuda) is torch.float16
    assert precision.grad_scaler(cuda, torch.float16).is_enabled() is torch.cuda.is_available()
    assert not precision.grad_scaler(cuda, torch.bfloat16).is_enabled()
    assert precision.training_dtype(CPU) is torch.float32


def test_float16_is_refused_on_a_cpu_with_the_fix():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        precision.inference_dtype("float16", CPU)
    with pytest.raises(SettingsError, match="INFERENCE_PRECISION=float16 needs CUDA"):
        Settings.from_env({"DEVICE": "cpu", "INFERENCE_PRECISION": "float16"})
    with pytest.raises(SettingsError, match="INFERENCE_PRECISION"):
        Settings.from_env({"INFERENCE_PRECISION": "int4"})
    assert Settings.from_env({}).inference_precision == "auto"
    assert Settings.from_env({"INFERENCE_PRECISION": "bfloat16"}).inference_precision == "bfloat16"


@pytest.fixture(scope="module")
def pair() -> tuple[Encoder, Encoder]:
    path = bundled_encoder_path()
    return Encoder(path, "cpu", 128, "float32"), Encoder(path, "cpu", 128, "bfloat16")


def test_a_bf16_encoder_on_cpu_serves_the_float32_answers(pair):
    full, half = pair
    assert next(half.model.parameters()).dtype is torch.bfloat16
    assert next(full.model.parameters()).dtype is torch.float32
    assert (full.precision_tag, half.precision_tag) == ("fp32", "bf16")
    rows = agnews("test", 300, offset=2000)
    texts = [t for t, _ in rows]
    a, b = full.encode(texts), half.encode(texts)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-4)  # pooled in float32
    cosine = (a * b).sum(axis=1)
    assert float(cosine.min()) > 0.999, cosine.min()
    # zero-shot by label name: the same topic for nearly every text
    rows_a, rows_b = full.encode(AGNEWS_LABELS), half.encode(AGNEWS_LABELS)
    same = np.mean((a @ rows_a.T).argmax(1) == (b @ rows_b.T).argmax(1))
    assert same >= 0.98, same


def test_training_reloads_float32_weights_from_a_bf16_serving_encoder(pair):
    full, half = pair
    assert full.trainable() is full
    trainable = half.trainable()
    assert trainable is not half and trainable.path == half.path
    assert next(trainable.model.parameters()).dtype is torch.float32
    assert next(half.model.parameters()).dtype is torch.bfloat16  # the serving copy is left as it was


def test_training_step_on_cpu_is_float32_and_lowers_the_loss():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 3)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    step = precision.TrainingStep(CPU, optimizer, layer.parameters(), max_norm=1.0)
    assert step.dtype is torch.float32 and not step.scaler.is_enabled()
    x = torch.randn(64, 8)
    y = (x @ torch.randn(8, 3)).argmax(dim=1)  # a learnable rule
    losses = []
    for _ in range(40):
        with step.autocast():
            loss = torch.nn.functional.cross_entropy(layer(x), y)
        step(loss)
        losses.append(float(loss))
    assert losses[-1] < losses[0] * 0.5, losses
    assert all(p.dtype is torch.float32 for p in layer.parameters())


def test_gpu_memory_cap_setting_and_its_no_op_on_a_cpu():
    assert Settings.from_env({}).train_gpu_memory_fraction == 0.0
    assert Settings.from_env({"TRAIN_GPU_MEMORY_FRACTION": "0.4"}).train_gpu_memory_fraction == 0.4
    with pytest.raises(SettingsError, match="TRAIN_GPU_MEMORY_FRACTION"):
        Settings.from_env({"TRAIN_GPU_MEMORY_FRACTION": "1.5"})
    assert precision.cap_gpu_memory(CPU, 0.4) is False  # nothing to cap on a CPU
    assert precision.cap_gpu_memory(torch.device("cuda"), 0.0) is False  # 0: no cap


def test_a_float32_student_reads_as_the_served_encoder_for_its_slice_figures():
    """A fine-tuned student trains in float32 and is served in bf16 where the CPU has it: its slice
    figures (and the contrastive candidate's heads) were computed in float32, not on what /predict sees."""
    texts = ["The striker scored twice in the final", "Shares fell after the earnings report", "A new chip ships"]
    student = Encoder(bundled_encoder_path(), "cpu", 64, "float32")
    served = Encoder(bundled_encoder_path(), "cpu", 64, "bfloat16")  # what a web worker loads from its folder
    before = student.encode(texts)
    twin = student.reading_as(served)
    assert twin is not student and twin.precision_tag == "bf16" == served.precision_tag
    assert np.array_equal(twin.encode(texts), served.encode(texts))  # exactly what /predict computes
    assert not np.array_equal(twin.encode(texts), before)
    assert student.weights_dtype is torch.float32 and np.array_equal(student.encode(texts), before)  # untouched
    assert student.reading_as(Encoder(bundled_encoder_path(), "cpu", 64, "float32")) is student
