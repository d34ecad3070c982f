"""The GPU path: device selection, bf16 training on CUDA, CUDA inference agreeing with the CPU.

The CUDA tests run only where torch sees a CUDA device and are skipped elsewhere with the reason
"no CUDA device" (the one skip allowed in CI, whose machines have no GPU).  The device-selection tests run
everywhere: on a machine without CUDA, ``DEVICE=auto`` must pick the CPU and the whole predictor work on it.
"""

from __future__ import annotations

import contextlib
import numpy as np
import pytest
import torch

from ls_backend.labeling import plan_for
from ls_backend.model import Encoder, heads_for_plan, resolve_device
from ls_backend.predictor import Predictor
from ls_backend.settings import Settings, bundled_encoder_path
from ls_backend.trainer import ControlData, TrainingArguments, fine_tune

from .conftest import TOPIC_CONFIG
from .support.data import AGNEWS_LABELS, agnews

PROJECT = "7.1732665262"
HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


@contextlib.contextmanager
def linear_dtypes(model: torch.nn.Module):
    """The dtypes every Linear inside ``model`` (and inside copies of it made meanwhile, which keep
    its hooks) computed in."""
    seen: set[torch.dtype] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def choices(results: list[dict]) -> list[str]:
    return [entry["result"][0]["value"]["choices"][0] for entry in results]


def scores(results: list[dict]) -> np.ndarray:
    return np.array([entry["score"] for entry in results])


# -- everywhere --------------------------------------------------------------------------
def test_device_auto_picks_cuda_only_when_present_and_the_predictor_serves_on_it(tmp_path):
    settings = Settings.from_env({"DEVICE": "auto", "MODEL_DIR": str(tmp_path / "models"), "MAX_LENGTH": "128"})
    expected = "cuda" if HAS_CUDA else "cpu"
    assert settings.device == "auto"
    assert resolve_device(settings.device).type == expected

    # the whole predictor, built from the settings as a web worker builds it (no encoder handed in)
    from ls_backend.api import create_app

    predictor = Predictor(settings)
    assert predictor.device.type == expected
    assert next(predictor.base_encoder.model.parameters()).device.type == expected
    client = create_app(settings, predictor).test_client()
    setup = client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG})
    assert setup.status_code == 200 and setup.json == {"model_version": "p7-v0"}
    rows = agnews("test", 100, offset=3000)
    response = client.post(
        "/predict",
        json={"project": PROJECT, "label_config": TOPIC_CONFIG, "tasks": [{"id": i, "data": {"text": t}} for i, (t, _) in enumerate(rows)]},
    )
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert len(results) == len(rows)
    assert all(entry["model_version"] == "p7-v0" and set(choices([entry])) <= set(AGNEWS_LABELS) for entry in results)
    accuracy = np.mean([p == gold for p, (_, gold) in zip(choices(results), rows)])
    assert accuracy > 0.5, accuracy  # zero-shot; chance is 0.25


def test_device_cuda_is_honoured_or_refused_with_the_reason():
    settings = Settings.from_env({"DEVICE": "cuda"})
    if HAS_CUDA:
        assert resolve_device(settings.device).type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="DEVICE=cuda but no CUDA device"):
            resolve_device(settings.device)


# -- CUDA only ---------------------------------------------------------------------------
@cuda_only
def test_fine_tune_a_few_steps_in_bf16_on_cuda():
    device = resolve_device(Settings.from_env({"DEVICE": "cuda"}).device)
    encoder = Encoder(bundled_encoder_path(), device, 128)
    plan = plan_for(TOPIC_CONFIG)
    heads = heads_for_plan(plan, {}, encoder, "{label}", 0.05, 0.5)
    train = agnews("dev", 256)
    held = agnews("test", 300, offset=1000)
    data = ControlData("topic", list(heads["topic"].labels), False, [t for t, _ in train], [(y,) for _, y in train])
    held_y = np.array([AGNEWS_LABELS.index(y) for _, y in held])
    before = heads["topic"].probabilities(encoder.encode([t for t, _ in held], 256)).argmax(axis=1)
    zero_shot_accuracy = float((before == held_y).mean())
    reference = {name: p.detach().clone() for name, p in list(encoder.model.named_parameters())[:3]}

    updates: list[dict] = []
    args = TrainingArguments(batch_size=32, max_length=128, epochs=1, min_steps=24, seed=13)
    with linear_dtypes(encoder.model) as seen:
        student, new_heads, report = fine_tune(encoder, heads, [data], args, progress=updates.append)

    assert report["steps"] == 24 and report["examples_seen"] == 24 * 32
    assert torch.bfloat16 in seen, f"no bf16 matmul under autocast (saw {seen})"
    losses = [u["loss"] for u in updates if u.get("stage") == "fine-tune"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    for name, param in student.model.named_parameters():
        assert param.device.type == "cuda" and param.dtype == torch.float32, name  # autocast, not a bf16 copy
        assert torch.isfinite(param).all(), name
    for name, value in reference.items():  # the encoder handed in is left as it was
        assert torch.equal(dict(encoder.model.named_parameters())[name], value), name
    head = new_heads["topic"]
    assert np.isfinite(head.weight).all() and np.isfinite(head.bias).all()
    after = head.probabilities(student.encode([t for t, _ in held], 256)).argmax(axis=1)
    accuracy = float((after == held_y).mean())
    assert accuracy >= max(0.75, zero_shot_accuracy), (accuracy, zero_shot_accuracy)


@cuda_only
def test_cuda_inference_matches_cpu_on_1000_agnews_sentences(tmp_path):
    """The same cold-start version (its zero-shot heads written once, by the CPU process, into the shared
    registry) served by a float32 CPU predictor and by a CUDA one (``INFERENCE_PRECISION=auto``: bf16
    autocast, fp16 on cards without bf16): the same choice for >= 99%."""
    rows = agnews("test", 1000)
    tasks = [{"id": i, "data": {"text": text}} for i, (text, _) in enumerate(rows)]
    model_dir = tmp_path / "models"
    cpu = Predictor(Settings(model_dir=model_dir, device="cpu", inference_precision="float32", max_length=128, batch_size=64))
    gpu = Predictor(Settings(model_dir=model_dir, device="cuda", max_length=128, batch_size=256))
    assert gpu.device.type == "cuda" and next(gpu.base_encoder.model.parameters()).is_cuda
    assert cpu.setup(PROJECT, TOPIC_CONFIG) == "p7-v0"
    assert gpu.setup(PROJECT, TOPIC_CONFIG) == "p7-v0"  # loaded from the registry, not re-made on the GPU

    on_cpu = cpu.predict(PROJECT, TOPIC_CONFIG, tasks)
    on_gpu = gpu.predict(PROJECT, TOPIC_CONFIG, tasks)
    assert len(on_cpu) == len(on_gpu) == 1000
    agreement = float(np.mean([a == b for a, b in zip(choices(on_cpu), choices(on_gpu))]))
    assert agreement >= 0.99, f"CUDA and CPU agree on {agreement:.3f} of 1000 texts"
    gap = np.abs(scores(on_cpu) - scores(on_gpu))
    assert float(np.median(gap)) < 0.02, f"median score gap {np.median(gap):.4f}"

    texts = [t for t, _ in rows[:200]]
    similarity = (cpu.base_encoder.encode(texts) * gpu.base_encoder.encode(texts)).sum(axis=1)
    assert float(similarity.min()) > 0.98, f"lowest CPU/CUDA embedding cosine {similarity.min():.4f}"


@cuda_only
def test_fine_tune_falls_back_to_fp16_with_a_gradient_scaler_where_bf16_is_missing(monkeypatch):
    """Cards without bf16 (before Ampere) train in fp16 autocast behind a gradient scaler; simulated on
    this card by reporting bf16 as missing."""
    from ls_backend import precision

    monkeypatch.setattr(precision, "cuda_supports_bf16", lambda: False)
    device = torch.device("cuda")
    assert precision.training_dtype(device) is torch.float16
    encoder = Encoder(bundled_encoder_path(), device, 128, "auto")
    assert encoder.dtype is torch.float16  # inference too
    plan = plan_for(TOPIC_CONFIG)
    heads = heads_for_plan(plan, {}, encoder, "{label}", 0.05, 0.5)
    train = agnews("dev", 256)
    data = ControlData("topic", list(heads["topic"].labels), False, [t for t, _ in train], [(y,) for _, y in train])
    scales: list[float] = []
    original = precision.TrainingStep.__call__

    def recording(self, loss):
        original(self, loss)
        scales.append(float(self.scaler.get_scale()) if self.scaler.is_enabled() else 0.0)

    monkeypatch.setattr(precision.TrainingStep, "__call__", recording)
    updates: list[dict] = []
    args = TrainingArguments(batch_size=32, max_length=128, epochs=1, min_steps=24, seed=13)
    with linear_dtypes(encoder.model) as seen:
        student, new_heads, report = fine_tune(encoder, heads, [data], args, progress=updates.append)
    assert torch.float16 in seen, f"no fp16 matmul under autocast (saw {seen})"
    # the scaler was on for every step (a disabled one reports nothing here), loss scaling above 1
    assert len(scales) == 24 and all(s > 1 for s in scales), scales
    losses = [u["loss"] for u in updates if u.get("stage") == "fine-tune"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in student.model.parameters())
    held = agnews("test", 300, offset=1000)
    after = new_heads["topic"].probabilities(student.encode([t for t, _ in held], 256)).argmax(axis=1)
    assert float((after == np.array([AGNEWS_LABELS.index(y) for _, y in held])).mean()) >= 0.75


@cuda_only
def test_training_memory_cap_stops_allocations_past_it():
    """TRAIN_GPU_MEMORY_FRACTION, as a job applies it, in a fresh process (the cap lasts as long as
    the process): 2 GiB fit without a cap and fail under a cap of 1% of the card."""
    import subprocess
    import sys

    probe = (
        "import sys, torch\n"
        "from ls_backend.precision import cap_gpu_memory\n"
        "from ls_backend.settings import Settings\n"
        "s = Settings.from_env({'TRAIN_GPU_MEMORY_FRACTION': sys.argv[1]})\n"
        "capped = cap_gpu_memory(torch.device('cuda'), s.train_gpu_memory_fraction)\n"
        "try:\n"
        "    torch.empty(2 * 1024 ** 3, dtype=torch.uint8, device='cuda')\n"
        "    print('allocated', capped)\n"
        "except torch.OutOfMemoryError:\n"
        "    print('refused', capped)\n"
    )
    results = {}
    for fraction in ("0", "0.01"):
        done = subprocess.run([sys.executable, "-c", probe, fraction], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        results[fraction] = done.stdout.split()[-2:]
    assert results == {"0": ["allocated", "False"], "0.01": ["refused", "True"]}, results
