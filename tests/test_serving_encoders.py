"""Which encoder serves: loaded as float32 whatever its checkpoint holds, reading no more tokens
than its model can, released once no project serves it, never installed after a rollback.

The checkpoints here are tiny, randomly initialised models written to a temporary folder (no
hub access): what is tested is how they load and are kept, not what they predict."""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ls_backend import predictor as predictor_module
from ls_backend.embeddings import weights_stamp
from ls_backend.model import Encoder
from ls_backend.predictor import Predictor
from ls_backend.registry import ModelRegistry
from ls_backend.settings import Settings, bundled_encoder_path

from .conftest import TOPIC_CONFIG

PROJECT = "7.1732665262"
OTHER = "8.1732665262"
TASKS = [{"id": 1, "data": {"text": "The Yankees beat the Red Sox"}}]


def tiny_bert(folder: Path, dtype: torch.dtype = torch.float32, model_max_length: int | None = None) -> Path:
    """A two-layer BERT of width 32 with the bundled encoder's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertModel(config).to(dtype).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(bundled_encoder_path())
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(folder)
    return folder


def tiny_roberta(folder: Path) -> Path:
    """A RoBERTa of width 32 with 514 positions (512 usable: ids start after the padding index 1),
    and a fast word-level tokenizer with RoBERTa's special tokens that names no length limit."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "word": 4, "other": 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=514, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    RobertaModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


# -- loading ----------------------------------------------------------------------------------------
def test_a_checkpoint_saved_in_fp16_loads_as_float32(tmp_path):
    folder = tiny_bert(tmp_path / "half", torch.float16)
    encoder = Encoder(folder, "cpu", 64, "float32")
    assert next(encoder.model.parameters()).dtype is torch.float32
    assert encoder.weights_dtype is torch.float32 and encoder.precision_tag == "fp32"
    assert encoder.trainable() is encoder  # training gets float32 weights, as it believes
    assert encoder.encode(["a short text", "another one"]).shape == (2, 32)


def test_roberta_style_positions_bound_the_max_length(tmp_path):
    encoder = Encoder(tiny_roberta(tmp_path / "roberta"), "cpu", 1024)
    assert encoder.tokenizer.model_max_length > 100_000  # no limit named: the positions alone bound it
    assert encoder.max_length == 512  # 514 positions, ids from padding index + 1
    long = " ".join(["word"] * 2000)
    embeddings = encoder.encode([long, "other word", long[:3000]], 2)
    assert embeddings.shape == (3, 32)


def test_the_tokenizers_model_max_length_bounds_the_max_length(tmp_path, tiny):
    assert Encoder(tiny, "cpu", 1024).max_length == 512  # BERT: every position usable
    bounded = Encoder(tiny_bert(tmp_path / "short", model_max_length=128), "cpu", 1024)
    assert bounded.max_length == 128
    assert Encoder(tmp_path / "short", "cpu", 64).max_length == 64  # MAX_LENGTH still bounds it first
    assert len(bounded.tokenize(["word " * 1000])[0]) == 128


# -- serving ----------------------------------------------------------------------------------------
def promote_own_encoder(registry: ModelRegistry, project: str, tiny: Path) -> str:
    """A new current version of ``project`` with an encoder folder of its own (a copy of ``tiny``)."""
    parent = registry.current(project)
    loaded = registry.load(project, parent)
    name = registry.create_version(
        project, loaded.heads, dict(loaded.meta, parent=parent, kind="test"),
        write_encoder=lambda folder: shutil.copytree(tiny, folder),
    )
    registry.promote(project, name)
    return name


def served_after_check(predictor: Predictor, project: str, version: str, timeout: float = 60) -> str:
    """Make ``predictor`` look for a new version now, and wait for its background load of ``version``."""
    predictor._serving[project].checked_at = -1e9  # past the check interval
    assert predictor.setup(project, TOPIC_CONFIG)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        serving = predictor._serving[project]
        if serving.loading is None and serving.version == version:
            break
        time.sleep(0.05)
    return predictor.predict(project, TOPIC_CONFIG, TASKS)[0]["model_version"]


def test_encoders_no_project_serves_are_released(tmp_path, tiny):
    settings = Settings(model_dir=tmp_path / "models", max_length=64)
    predictor = Predictor(settings, encoder=Encoder(tiny, "cpu", 64))
    registry = predictor.registry
    for project in (PROJECT, OTHER):
        predictor.setup(project, TOPIC_CONFIG)
    other = promote_own_encoder(registry, OTHER, tiny)
    assert served_after_check(predictor, OTHER, other) == other
    for _ in range(4):
        name = promote_own_encoder(registry, PROJECT, tiny)
        assert served_after_check(predictor, PROJECT, name) == name
        # this project's current encoder and the other project's: the earlier ones are gone
        assert sorted(predictor._encoders) == sorted(
            [registry.load(PROJECT, name).encoder_path, registry.load(OTHER, other).encoder_path]
        )
    assert set(predictor._serving) == {PROJECT, OTHER}  # one entry per project, replaced on each switch
    registry.rollback(OTHER)  # back to the base encoder: its fine-tuned one goes too
    assert served_after_check(predictor, OTHER, "p8-v0") == "p8-v0"
    assert list(predictor._encoders) == [registry.load(PROJECT, name).encoder_path]


def test_a_version_rolled_back_while_it_loaded_is_not_installed(tmp_path, tiny, monkeypatch):
    settings = Settings(model_dir=tmp_path / "models", max_length=64)
    predictor = Predictor(settings, encoder=Encoder(tiny, "cpu", 64))
    registry = predictor.registry
    assert predictor.setup(PROJECT, TOPIC_CONFIG) == "p7-v0"
    started, release = threading.Event(), threading.Event()

    def slow_encoder(*args, **kwargs):
        started.set()
        assert release.wait(30)
        return Encoder(*args, **kwargs)

    monkeypatch.setattr(predictor_module, "Encoder", slow_encoder)
    name = promote_own_encoder(registry, PROJECT, tiny)
    predictor._serving[PROJECT].checked_at = -1e9
    assert predictor.predict(PROJECT, TOPIC_CONFIG, TASKS)[0]["model_version"] == "p7-v0"  # served while it loads
    assert started.wait(30) and predictor._serving[PROJECT].loading == name
    assert registry.rollback(PROJECT) == "p7-v0"
    release.set()
    deadline = time.monotonic() + 30
    while predictor._serving[PROJECT].loading is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert predictor._serving[PROJECT].loading is None
    assert predictor._serving[PROJECT].version == "p7-v0"
    assert predictor._encoders == {}  # the encoder it loaded for nothing is not kept
    assert predictor.predict(PROJECT, TOPIC_CONFIG, TASKS)[0]["model_version"] == "p7-v0"


def test_requests_that_need_the_same_encoder_at_once_load_it_once(tmp_path, tiny, monkeypatch):
    settings = Settings(model_dir=tmp_path / "models", max_length=64)
    predictor = Predictor(settings, encoder=Encoder(tiny, "cpu", 64))
    built = []

    def counted(*args, **kwargs):
        built.append(args[0])
        time.sleep(0.3)  # long enough for every thread to ask while the first one loads
        return Encoder(*args, **kwargs)

    monkeypatch.setattr(predictor_module, "Encoder", counted)
    got = []
    threads = [threading.Thread(target=lambda: got.append(predictor.encoder_for(str(tiny)))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(built) == 1 and len(got) == 4 and all(e is got[0] for e in got)


def test_past_max_served_encoders_the_least_recently_asked_projects_are_loaded_again_on_demand(tmp_path, tiny):
    settings = Settings(model_dir=tmp_path / "models", max_length=64, max_served_encoders=2)
    writer = Predictor(settings, encoder=Encoder(tiny, "cpu", 64))
    projects = [f"{i}.1732665262" for i in (21, 22, 23)]
    versions = {}
    for project in projects:
        writer.setup(project, TOPIC_CONFIG)
        versions[project] = promote_own_encoder(writer.registry, project, tiny)
    predictor = Predictor(settings, encoder=Encoder(tiny, "cpu", 64))  # a web worker started now
    for project in projects:
        assert predictor.predict(project, TOPIC_CONFIG, TASKS)[0]["model_version"] == versions[project]
    assert sorted(predictor._serving) == projects[1:]  # the first one asked for was forgotten
    assert len(predictor._encoders) == 2  # and its encoder freed
    assert predictor.predict(projects[0], TOPIC_CONFIG, TASKS)[0]["model_version"] == versions[projects[0]]
    assert sorted(predictor._serving) == [projects[0], projects[2]] and len(predictor._encoders) == 2
    unlimited = Predictor(settings.with_overrides(max_served_encoders=0), encoder=Encoder(tiny, "cpu", 64))
    for project in projects:
        unlimited.predict(project, TOPIC_CONFIG, TASKS)
    assert len(unlimited._serving) == 3 and len(unlimited._encoders) == 3


# -- BASE_MODEL changed ------------------------------------------------------------------------------
def test_after_base_model_changes_a_project_starts_over_on_the_new_encoder(tmp_path, tiny):
    """Versions made on the bundled encoder, then BASE_MODEL set to another model: their rows mean
    nothing to its embeddings (here of another width, a 500 on every request before), so /setup
    answers a new cold start on it, which /predict serves; a version from before the base
    model's fingerprint was kept is told by its heads' width."""
    models = tmp_path / "models"
    before = Predictor(Settings(model_dir=models, max_length=64), encoder=Encoder(bundled_encoder_path(), "cpu", 64))
    assert before.setup(PROJECT, TOPIC_CONFIG) == "p7-v0"
    assert before.setup(OTHER, TOPIC_CONFIG) == "p8-v0"
    registry = ModelRegistry(models)
    meta = registry.meta(OTHER, "p8-v0")
    meta.pop("base_stamp")  # as a version written before the stamp
    (registry.version_dir(OTHER, "p8-v0") / "meta.json").write_text(json.dumps(meta))

    settings = Settings(model_dir=models, max_length=64, base_model=str(tiny))
    after = Predictor(settings)
    assert after.setup(PROJECT, TOPIC_CONFIG) == "p7-v1"
    got = after.predict(PROJECT, TOPIC_CONFIG, TASKS)[0]
    assert got["model_version"] == "p7-v1" and got["result"]
    fresh = registry.meta(PROJECT, "p7-v1")
    assert fresh["kind"] == "cold-start" and fresh["parent"] is None
    assert fresh["base_stamp"] == weights_stamp(str(tiny)) != registry.meta(PROJECT, "p7-v0")["base_stamp"]
    assert after.predict(OTHER, TOPIC_CONFIG, TASKS)[0]["model_version"] == "p8-v1"
    # the same BASE_MODEL again: nothing new
    assert Predictor(settings).setup(PROJECT, TOPIC_CONFIG) == "p7-v1"


def test_a_base_model_of_the_same_width_but_other_weights_is_told_by_its_files(tmp_path, tiny):
    models = tmp_path / "models"
    twin = tiny_bert(tmp_path / "twin")  # the same shape and seed: the same files
    other = tmp_path / "other"
    shutil.copytree(twin, other)
    from transformers import BertModel

    model = BertModel.from_pretrained(other)
    with torch.no_grad():
        model.pooler.dense.bias.add_(1.0)  # other weights, the same width
    model.save_pretrained(other)
    first = Predictor(Settings(model_dir=models, max_length=64, base_model=str(twin)))
    assert first.setup(PROJECT, TOPIC_CONFIG) == "p7-v0"
    assert Predictor(Settings(model_dir=models, max_length=64, base_model=str(tiny))).setup(PROJECT, TOPIC_CONFIG) == "p7-v0"
    assert Predictor(Settings(model_dir=models, max_length=64, base_model=str(other))).setup(PROJECT, TOPIC_CONFIG) == "p7-v1"


def test_a_job_after_base_model_changes_trains_the_new_encoder_from_a_cold_start(tmp_path, tiny):
    from ls_backend.finetune import FineTuneJob
    from ls_backend.store import CorrectionStore

    from .support.events import annotation_event, choices, key_of
    from .support.loop import balanced_agnews

    key = key_of(3)
    models = tmp_path / "models"
    first = Settings(model_dir=models, max_length=64, train_mode="frozen", eval_min=10)
    store = CorrectionStore.from_settings(first)
    try:
        for n, (task_id, text, label) in enumerate(balanced_agnews(8)):
            store.record_event(annotation_event(n + 1, task_id, choices(label), text=text))
        assert FineTuneJob(first, store).run(key)["promoted"]
        registry = ModelRegistry(models)
        trained = registry.current(key)
        # a random tiny encoder reads AG News no better than its zero-shot start: no slice to judge it on
        outcome = FineTuneJob(replace(first, base_model=str(tiny), eval_min=1000), store).run(key)
        assert outcome["promoted"], outcome
        now = registry.meta(key, registry.current(key))
        start = registry.meta(key, now["parent"])
        assert start["kind"] == "cold-start" and start["parent"] is None and now["parent"] != trained
        assert now["base_stamp"] == weights_stamp(str(tiny))
        assert registry.load(key, registry.current(key)).heads["topic"].weight.shape[1] == 32
    finally:
        store.close()


def _fresh_worker_with_held_encoder_loads(tmp_path, tiny, monkeypatch):
    """A project served by a version with an encoder of its own, a worker started since, and that
    worker's encoder loads held until ``release`` is set (as a cold disk holds them); returns the
    writer, the version's name, the fresh worker, the loads' event and the paths they load."""
    settings = Settings(model_dir=tmp_path / "models", max_length=64)
    writer = Predictor(settings, encoder=Encoder(tiny, "cpu", 64))
    assert writer.setup(PROJECT, TOPIC_CONFIG) == "p7-v0"
    name = promote_own_encoder(writer.registry, PROJECT, tiny)
    fresh = Predictor(settings, encoder=Encoder(tiny, "cpu", 64))
    started, release, built = threading.Event(), threading.Event(), []

    def slow_encoder(*args, **kwargs):
        built.append(args[0])
        started.set()
        assert release.wait(30)
        return Encoder(*args, **kwargs)

    monkeypatch.setattr(predictor_module, "Encoder", slow_encoder)
    return writer, name, fresh, started, release, built


def test_setup_in_a_fresh_worker_answers_while_a_fine_tuned_encoder_loads(tmp_path, tiny, monkeypatch):
    """Label Studio gives /setup 3 s: a worker started after a promotion names the version at once
    and loads its encoder in the background; /predict waits for that one load."""
    writer, name, fresh, started, release, built = _fresh_worker_with_held_encoder_loads(tmp_path, tiny, monkeypatch)
    answers, predicted = [], []
    try:
        setup = threading.Thread(target=lambda: answers.append(fresh.setup(PROJECT, TOPIC_CONFIG)))
        setup.start()
        setup.join(10)
        assert answers == [name]  # answered while the encoder has not loaded
        assert started.wait(30) and not release.is_set()
        assert fresh.setup(PROJECT, TOPIC_CONFIG) == name  # again meanwhile: the same answer at once
        request = threading.Thread(target=lambda: predicted.append(fresh.predict(PROJECT, TOPIC_CONFIG, TASKS)))
        request.start()
    finally:
        release.set()
    request.join(30)
    assert predicted and predicted[0][0]["model_version"] == name
    assert built == [writer.registry.load(PROJECT, name).encoder_path]  # loaded once, for all three calls


def test_setup_after_a_label_config_change_answers_while_the_encoder_loads(tmp_path, tiny, monkeypatch):
    """A label added: the served version is re-shaped to the new config, which embeds the new label
    with its fine-tuned encoder; a fresh worker loaded that encoder inside /setup, past Label
    Studio's 3 s on a cold disk. It now names the version it is made from, and writes the new one
    in the background."""
    writer, name, fresh, started, release, _ = _fresh_worker_with_held_encoder_loads(tmp_path, tiny, monkeypatch)
    changed = TOPIC_CONFIG.replace("</Choices>", '<Choice value="Health"/></Choices>')
    assert changed != TOPIC_CONFIG
    answers, predicted = [], []
    try:
        setup = threading.Thread(target=lambda: answers.append(fresh.setup(PROJECT, changed)))
        setup.start()
        setup.join(10)
        assert answers == [name] and started.wait(30)  # at once, the re-shape waiting for the encoder
        request = threading.Thread(target=lambda: predicted.append(fresh.predict(PROJECT, changed, TASKS)))
        request.start()
    finally:
        release.set()
    request.join(30)
    reshaped = predicted[0][0]["model_version"]
    assert reshaped != name and writer.registry.meta(PROJECT, reshaped)["parent"] == name
    assert "Health" in writer.registry.load(PROJECT, reshaped).heads["topic"].labels
    assert fresh.setup(PROJECT, changed) == reshaped
