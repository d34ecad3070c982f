"""Training jobs end to end: labels by webhook -> coalesced jobs -> a promoted version served live.

Real parts: the server as the README starts it, the embedded job runner it spawns, a real
Redis with real rq worker processes, and real training of the bundled encoder's heads.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from ls_backend.jobs import EmbeddedTrainingQueue, RedisTrainingQueue
from ls_backend.settings import Settings
from ls_backend.trainer import TrainingArguments, full_schedule

from .support.backend import REPO, BackendServer, console_script, server_environment
from .support.data import AGNEWS_LABELS, agnews
from .support.events import TOPIC_CONFIG
from .support.loop import LoopClient, balanced_agnews
from .support.services import unavailable

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="module")
def redis_url():
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        unavailable(f"Redis at {REDIS_URL} does not answer ({exc})")
    return REDIS_URL


@pytest.fixture
def queue_name():
    return f"lsb-test-{uuid.uuid4().hex[:8]}"


def start_worker(model_dir, env: dict) -> subprocess.Popen:
    # the backend's settings come from the test alone, as for its web server (a deploy host's
    # DATABASE_URL would give the worker another store than the server's)
    full_env = server_environment(dict(MODEL_DIR=str(model_dir), HF_HUB_OFFLINE="1", **env))
    log = open(model_dir.parent / f"worker-{uuid.uuid4().hex[:6]}.log", "ab")
    process = subprocess.Popen(
        console_script() + ["worker"], env=full_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    process.args_queue = env.get("QUEUE_NAME")  # so stop() also ends the work horses
    return process


def processes_of_queue(queue: str) -> list[int]:
    """Every process started with QUEUE_NAME=queue: rq workers and their work horses (a work
    horse runs in a process group of its own, so killing the worker's group misses it)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if b"worker" not in handle.read().split(b"\0"):
                    continue  # not an ls-backend worker (the web server shares the environment)
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if f"QUEUE_NAME={queue}".encode() in handle.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def kill_queue_processes(queue: str) -> None:
    for pid in processes_of_queue(queue):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop(process: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    queue = process.args_queue if hasattr(process, "args_queue") else None
    if queue:
        kill_queue_processes(queue)


def _job_when_done(url: str, job_id: str, timeout: float) -> dict:
    """The job as ``GET /jobs/<id>`` shows it once finished or failed (or at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        job = requests.get(f"{url}/jobs/{job_id}", timeout=5).json()
        if job["state"] in ("finished", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


TEST_ROWS = 300


def run_labeling_loop(server: BackendServer) -> None:
    """64 labels (16 per topic) by webhook -> at most 2 jobs -> a better version, live."""
    loop = LoopClient(server.url, project_id=3)
    assert loop.setup() == "p3-v0"
    test_rows = agnews("test", TEST_ROWS)
    cold_accuracy, cold_versions = loop.accuracy(test_rows)
    assert cold_versions == {"p3-v0"}

    loop.label(balanced_agnews(16))
    jobs = loop.wait_idle(timeout=600)
    assert 1 <= len(jobs) <= 2, jobs  # TRAIN_EVERY=16 and 64 labels: coalesced
    assert all(job["state"] == "finished" for job in jobs), jobs
    versions = loop.versions()
    new_version = versions["current"]
    assert new_version != "p3-v0"
    row = next(v for v in versions["versions"] if v["version"] == new_version)
    assert row["kind"] == "fine-tune" and row["promoted"] and row["data"]["topic"]["train"] > 40

    time.sleep(1.5)  # past VERSION_CHECK_INTERVAL: every web worker notices on its next request
    assert loop.setup() == new_version
    accuracy, served = loop.accuracy(test_rows)
    assert served == {new_version}
    assert accuracy > cold_accuracy + 0.03, (accuracy, cold_accuracy)


def test_embedded_runner_trains_and_serves_without_redis(tmp_path):
    env = {"TRAIN_EVERY": "16", "TRAIN_MODE": "frozen", "WEB_WORKERS": "2", "REDIS_URL": ""}
    with BackendServer(tmp_path / "models", env=env) as server:
        run_labeling_loop(server)


def test_rq_worker_trains_and_serves(tmp_path, redis_url, queue_name):
    env = {"TRAIN_EVERY": "16", "TRAIN_MODE": "frozen", "WEB_WORKERS": "2", "REDIS_URL": redis_url, "QUEUE_NAME": queue_name}
    worker = start_worker(tmp_path / "models", env)
    try:
        with BackendServer(tmp_path / "models", env=env) as server:
            run_labeling_loop(server)
            # the web server started no embedded runner: the rq worker did the work
            jobs = LoopClient(server.url).jobs()
            assert all(job["id"].startswith("train-") for job in jobs)
    finally:
        stop(worker)


def test_burst_of_labels_coalesces_into_at_most_two_jobs(tmp_path):
    settings = Settings(model_dir=tmp_path, train_every=10)
    queue = EmbeddedTrainingQueue(settings)
    created = [queue.enqueue("5.1", "labels")[1] for _ in range(100)]
    assert created.count(True) == 1
    running = queue.claim()  # a runner takes it: the next labels queue one more job
    assert running is not None and running.state == "running"
    created = [queue.enqueue("5.1", "labels")[1] for _ in range(100)]
    assert created.count(True) == 1
    assert queue.claim() is None  # one running job per project at a time
    assert [job.state for job in queue.jobs("5.1")] == ["queued", "running"]
    assert queue.enqueue("6.1", "labels")[1]  # other projects are independent


def labels_while_a_job_runs(queue, store, run) -> None:
    """TRAIN_EVERY=3 (full lane only): a label that arrives while the project's job runs queues no
    job for itself; the count since the job's cut-off does, once the job has ended."""
    from ls_backend.jobs import FULL
    from tests.support.events import annotation_event, choices, key_of

    key = key_of(3)

    def label(n: int):
        return queue.maybe_enqueue(store, store.record_event(annotation_event(n, n, choices("World"))))

    assert [label(n) for n in (1, 2)] == [None, None]
    first = label(3)
    assert first is not None and first.lane == FULL
    with run(first) as cutoff:  # the job has taken its cut-off: labels 1-3
        assert cutoff == store.current_seq(key)
        assert [label(n) for n in (4, 5)] == [None, None]  # two labels past it: no job for them
        assert label(6) is None  # three: the running job queues the next one when it ends
        assert [job.state for job in queue.jobs(key)] == ["running"]
    store.mark_trained(key, cutoff)  # what the job did when it ended
    assert store.labels_since_training(key) == 3
    assert label(7) is not None  # no job runs now: the labels past the cut-off queue one
    assert [job.state for job in queue.jobs(key)].count("queued") == 1


def test_labels_arriving_while_a_job_runs_queue_no_job_of_their_own(tmp_path):
    from ls_backend.store import CorrectionStore

    settings = Settings(model_dir=tmp_path, train_every=3, train_mode="full")
    queue, store = EmbeddedTrainingQueue(settings), CorrectionStore.from_settings(settings)

    @contextlib.contextmanager
    def run(job):
        claimed = queue.claim(job.lane)
        assert claimed.id == job.id
        yield store.current_seq(job.project)
        queue.finish(job.id, {})

    try:
        labels_while_a_job_runs(queue, store, run)
    finally:
        store.close()


def test_labels_arriving_while_an_rq_job_runs_queue_no_job_of_their_own(redis_url, queue_name, tmp_path):
    from ls_backend.jobs import LOCK_TTL, renewed_lock
    from ls_backend.store import CorrectionStore

    settings = Settings(model_dir=tmp_path, train_every=3, train_mode="full", redis_url=redis_url, queue_name=queue_name)
    queue, store = RedisTrainingQueue(settings), CorrectionStore.from_settings(settings)

    @contextlib.contextmanager
    def run(job):  # what ``train_project`` does around the training, with rq's own status
        from rq.job import Job

        rq_job = Job.fetch(job.id, connection=queue.connection)
        with renewed_lock(queue.connection, queue.key(f"lock:{job.lane}", job.project), LOCK_TTL, 5, "test"):
            queue.queues[job.lane].remove(rq_job)
            rq_job.set_status("started")
            queue.release_queued(job.project, job.id, job.lane)
            yield store.current_seq(job.project)
        rq_job.set_status("finished")

    try:
        labels_while_a_job_runs(queue, store, run)
    finally:
        store.close()
        keys = queue.connection.keys(f"{queue_name}*") + queue.connection.keys(f"rq:*{queue_name}*")
        if keys:
            queue.connection.delete(*keys)


def test_triggers_merge_so_that_no_request_is_lost():
    from ls_backend.jobs import merge_triggers, split_trigger

    assert merge_triggers("refresh", "labels") == "labels+refresh"  # training is not swallowed by a refresh
    assert merge_triggers("refresh", "START_TRAINING") == "START_TRAINING+refresh"
    assert merge_triggers("labels", "refresh") == "labels+refresh"
    assert merge_triggers("labels", "START_TRAINING") == "START_TRAINING"  # its sync is kept
    assert merge_triggers("START_TRAINING", "labels") == "START_TRAINING"
    assert merge_triggers("labels+refresh", "manual") == "labels+refresh"
    assert merge_triggers("refresh", "refresh") == "refresh"
    assert merge_triggers("manual", "labels") == "manual"
    assert split_trigger("refresh") == ("", True)
    assert split_trigger("api+refresh") == ("api", True)
    assert split_trigger("schedule") == ("schedule", False)


def test_a_failed_job_with_a_queued_successor_hands_its_trigger_on(tmp_path):
    queue = EmbeddedTrainingQueue(Settings(model_dir=tmp_path, job_retries=1))
    pressed, _ = queue.enqueue("5.1", "START_TRAINING+refresh")
    assert queue.claim().id == pressed.id
    labels, created = queue.enqueue("5.1", "labels")  # queued while the first one runs
    assert created
    queue.fail(pressed.id, "the job process died", retry=True)
    # the queued job is the retry: it syncs first and refreshes at the end, as the pressed one would have
    assert queue.get(labels.id).trigger == "START_TRAINING+refresh"
    failed = queue.get(pressed.id)
    assert failed.state == "failed" and f"retried as {labels.id}" in failed.error
    assert [job.state for job in queue.jobs("5.1")].count("queued") == 1


def test_a_training_request_joins_a_queued_refresh_instead_of_vanishing(tmp_path):
    queue = EmbeddedTrainingQueue(Settings(model_dir=tmp_path))
    refresh, created = queue.enqueue("5.1", "refresh")
    assert created
    joined, created = queue.enqueue("5.1", "START_TRAINING")
    assert not created and joined.id == refresh.id
    assert joined.trigger == queue.get(refresh.id).trigger == "START_TRAINING+refresh"
    assert queue.claim().trigger == "START_TRAINING+refresh"


def test_redis_queue_merges_triggers_in_place(redis_url, queue_name, tmp_path):
    queue = RedisTrainingQueue(Settings(model_dir=tmp_path, redis_url=redis_url, queue_name=queue_name))
    try:
        before, _ = queue.enqueue("4.1", "labels", "fast")
        first, _ = queue.enqueue("5.1", "labels", "fast")
        other, _ = queue.enqueue("6.1", "labels", "fast")
        refresh, created = queue.enqueue("5.1", "refresh", "fast")
        assert not created and refresh.id == first.id and refresh.trigger == "labels+refresh"
        from rq.job import Job

        job = Job.fetch(first.id, connection=queue.connection)
        assert job.args == ("5.1", "labels+refresh", "fast")  # what the worker will run
        # in its place, once: not ahead of the job queued before it, nor behind the one after
        assert queue.queues["fast"].job_ids == [before.id, first.id, other.id]
        assert queue.enqueue("5.1", "manual", "fast")[0].trigger == "labels+refresh"
        # the queued marker outlives a long queue: not hours, which let a label queue a second job
        assert queue.connection.ttl(queue.key("queued:fast", "5.1")) > 86400
        # a worker takes the job between the status check and the rewrite: a job of its own is queued
        queue.connection.lrem(queue.queues["fast"].key, 0, first.id)
        late, created = queue.enqueue("5.1", "START_TRAINING", "fast")  # a trigger that would change it
        assert created and late.id != first.id and late.trigger == "START_TRAINING"
        assert queue.queues["fast"].job_ids == [before.id, other.id, late.id]
    finally:
        for q in queue.queues.values():
            q.empty()
        queue.close()


def _clear(queue: RedisTrainingQueue) -> None:
    """A test's rq queues emptied, retries waiting for their back-off included, and closed."""
    for q in queue.queues.values():
        q.empty()
        for scheduled in q.scheduled_job_registry.get_job_ids():
            q.scheduled_job_registry.remove(scheduled)
    queue.close()


def test_a_trigger_while_an_rq_job_waits_for_its_retry_joins_the_retry(redis_url, queue_name, tmp_path, monkeypatch):
    """A real rq worker runs a job that fails for real (its store's database does not answer):
    while the job waits for its retry, triggers join it instead of queuing a second job, and its
    status says why it waits."""
    from rq import SimpleWorker
    from rq.job import Job

    env = {"REDIS_URL": redis_url, "QUEUE_NAME": queue_name, "MODEL_DIR": str(tmp_path), "JOB_RETRIES": "2",
           "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"}  # nothing listens on port 1
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    queue = RedisTrainingQueue(Settings.from_env())
    try:
        job, _ = queue.enqueue("3.1", "labels")
        SimpleWorker([queue.queue], connection=queue.connection).work(burst=True)
        waiting = queue.get(job.id)
        assert Job.fetch(job.id, connection=queue.connection).get_status() == "scheduled"  # rq's back-off
        assert waiting.state == "queued" and waiting.attempts == 1, waiting
        assert waiting.started_at is None and waiting.duration is None and waiting.progress == {}
        assert waiting.error.startswith("attempt 1 failed: OperationalError"), waiting.error
        again, created = queue.enqueue("3.1", "labels")  # the next label
        assert not created and again.id == job.id
        pressed, created = queue.enqueue("3.1", "START_TRAINING")  # a trigger that asks for more
        assert not created and pressed.id == job.id and pressed.trigger == "START_TRAINING"
        assert Job.fetch(job.id, connection=queue.connection).args == ("3.1", "START_TRAINING", "full")  # the retry's
        assert [j.id for j in queue.jobs("3.1")] == [job.id]
    finally:
        _clear(queue)


def test_redis_queue_coalesces_enqueues_that_race(redis_url, queue_name, tmp_path):
    """Webhooks arrive together: between one enqueuer setting the queued key and rq writing the
    job, another must not take the key for stale and queue a second job."""
    settings = Settings(model_dir=tmp_path, redis_url=redis_url, queue_name=queue_name)
    for trial in range(5):
        queues = [RedisTrainingQueue(settings) for _ in range(8)]
        barrier = threading.Barrier(len(queues))
        created = []

        def enqueue(queue):
            barrier.wait()
            created.append(queue.enqueue(f"{trial}.1", "labels")[1])

        threads = [threading.Thread(target=enqueue, args=(q,)) for q in queues]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        try:
            assert created.count(True) == 1
            assert len(queues[0].queue.job_ids) == 1
        finally:
            queues[0].queue.empty()
            for queue in queues:
                queue.close()


def test_a_job_keeps_its_redis_lock_past_the_lock_ttl(redis_url, queue_name):
    """The lock is renewed by another thread than the one that took it: a job running past the
    TTL must still hold it, or a second job of the project would start beside it."""
    import redis

    from ls_backend.jobs import renewed_lock

    connection = redis.Redis.from_url(redis_url)
    key = f"{queue_name}:lock:full:5.1"
    try:
        with renewed_lock(connection, key, 0.6, 1, "project 5.1"):
            deadline = time.monotonic() + 2.0  # over three TTLs
            while time.monotonic() < deadline:
                assert not connection.lock(key, timeout=5).acquire(blocking=False), "the lock expired while held"
                time.sleep(0.1)
        other = connection.lock(key, timeout=5)
        assert other.acquire(blocking=False)  # released at the end
        other.release()
    finally:
        connection.delete(key)
        connection.close()


def test_a_job_takes_its_redis_lock_back_after_it_expired_while_redis_was_away(redis_url, queue_name, caplog):
    """Redis away for longer than LOCK_TTL (or back without its data): the lock was gone and its
    renewal failed for good, so the next job of the project started beside the running one."""
    import redis

    from ls_backend.jobs import renewed_lock

    connection = redis.Redis.from_url(redis_url)
    key = f"{queue_name}:lock:full:5.1"
    try:
        with renewed_lock(connection, key, 0.6, 1, "project 5.1"):
            token = connection.get(key)
            connection.delete(key)  # what an expiry while Redis was away leaves
            time.sleep(0.5)  # a renewal tick or two
            assert connection.get(key) == token and "taken back" in caplog.text
            assert not connection.lock(key, timeout=5).acquire(blocking=False)
            connection.set(key, b"another job")  # taken by another job in between: not overwritten
            time.sleep(0.5)
            assert connection.get(key) == b"another job" and "another job holds it now" in caplog.text
    finally:
        connection.delete(key)
        connection.close()


def test_redis_queue_coalesces(redis_url, queue_name, tmp_path):
    settings = Settings(model_dir=tmp_path, redis_url=redis_url, queue_name=queue_name)
    queue = RedisTrainingQueue(settings)
    try:
        outcomes = [queue.enqueue("5.1", "labels") for _ in range(100)]
        assert sum(created for _, created in outcomes) == 1
        job_id = outcomes[0][0].id
        assert {job.id for job, _ in outcomes} == {job_id}
        assert [job.state for job in queue.jobs("5.1")] == ["queued"]
        from rq.job import Job

        # what a worker does as it starts the job, and the job once it holds the project lock
        Job.fetch(job_id, connection=queue.connection).set_status("started")
        queue.release_queued("5.1", job_id)
        again, created = queue.enqueue("5.1", "labels")
        assert created and again.id != job_id
    finally:
        queue.queue.empty()
        queue.close()


def test_full_schedule_rule():
    args = TrainingArguments(batch_size=16, min_steps=50, max_epochs=20, target_examples=2048)
    assert full_schedule(16, args) == (20, 50)  # floor of steps for tiny sets
    assert full_schedule(256, args) == (8, 128)
    assert full_schedule(10_000, args) == (3, 1875)  # epoch cap for large sets
    assert full_schedule(0, args) == (0, 0)
    assert full_schedule(256, TrainingArguments(epochs=2, batch_size=16)) == (2, 50)


@pytest.mark.parametrize("labels, trained, schedule", [(16, 16, (20, 50)), (256, 218, (10, 140)), (10_000, 8500, (3, 1596))])
def test_the_schedule_a_job_runs_follows_the_labels_left_after_the_validation_split(labels, trained, schedule):
    """The README's worked examples: from 100 labels on, 15% are held out before the schedule is set."""
    from ls_backend.trainer import ControlData, split_for_validation

    data = ControlData("topic", ["a", "b"], False, [f"text {i}" for i in range(labels)], [i % 2 for i in range(labels)])
    kept, _ = split_for_validation(data, 0.15, seed=13)
    assert len(kept) == trained
    assert full_schedule(len(kept), TrainingArguments()) == schedule


def test_killed_worker_keeps_the_old_version_serving_and_the_job_is_retried(tmp_path, redis_url, queue_name):
    env = {
        "TRAIN_EVERY": "0",
        "TRAIN_MODE": "full",
        "TRAIN_EPOCHS": "1",
        "TRAIN_MIN_STEPS": "400",
        "REDIS_URL": redis_url,
        "QUEUE_NAME": queue_name,
        "WEB_WORKERS": "1",
        "JOB_RETRIES": "1",
    }
    with BackendServer(tmp_path / "models", env=env) as server:
        loop = LoopClient(server.url, project_id=4)
        assert loop.setup() == "p4-v0"
        loop.label(balanced_agnews(4))
        response = requests.post(f"{server.url}/projects/{loop.key}/train", timeout=10)
        assert response.status_code == 202
        job_id = response.json()["job"]["id"]
        worker = start_worker(tmp_path / "models", env)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                job = requests.get(f"{server.url}/jobs/{job_id}", timeout=5).json()
                if job.get("progress", {}).get("stage") == "fine-tune":
                    break
                time.sleep(0.5)
            else:
                pytest.fail(f"the job never reached fine-tuning: {job}")
            # the worker machine dies mid-training: the worker and its work horse
            os.killpg(worker.pid, signal.SIGKILL)
            kill_queue_processes(queue_name)
            worker.wait(timeout=10)
            assert processes_of_queue(queue_name) == []
        finally:
            stop(worker, signal.SIGKILL)
        versions = loop.versions()
        assert versions["current"] == "p4-v0"
        assert [v["version"] for v in versions["versions"]] == ["p4-v0"]  # nothing half-written is listed
        assert loop.setup() == "p4-v0"
        assert loop.predict(["Stocks rallied on Friday"])[0]["model_version"] == "p4-v0"
        # a fresh worker finds the abandoned job and retries it (JOB_RETRIES=1): the retry trains
        worker = start_worker(tmp_path / "models", dict(env, TRAIN_MIN_STEPS="5"))
        try:
            job = _job_when_done(server.url, job_id, timeout=300)
            assert job["state"] == "finished", job
            assert loop.versions()["current"] != "p4-v0"
        finally:
            stop(worker)


def test_two_projects_trained_at_once_stay_isolated(tmp_path, redis_url, queue_name):
    env = {"TRAIN_EVERY": "0", "TRAIN_MODE": "frozen", "REDIS_URL": redis_url, "QUEUE_NAME": queue_name, "WEB_WORKERS": "1"}
    sentiment = """<View><Text name="text" value="$text"/>
      <Choices name="sentiment" toName="text"><Choice value="Positive"/><Choice value="Negative"/></Choices></View>"""
    workers = [start_worker(tmp_path / "models", env) for _ in range(2)]
    try:
        with BackendServer(tmp_path / "models", env=env) as server:
            topics = LoopClient(server.url, project_id=11, config=TOPIC_CONFIG)
            moods = LoopClient(server.url, project_id=12, config=sentiment)
            assert topics.setup() == "p11-v0" and moods.setup() == "p12-v0"
            topics.label(balanced_agnews(6))
            from .support.data import sst2
            from .support.events import annotation_event, choices

            for n, (text, label) in enumerate(sst2("train", 24, min_words=6)):
                event = annotation_event(5000 + n, 9000 + n, choices("Positive" if label else "Negative", control="sentiment"), text=text, proj=moods.project)
                assert requests.post(server.url + "/webhook", json=event, timeout=5).status_code == 200
            for loop in (topics, moods):
                assert requests.post(f"{server.url}/projects/{loop.key}/train", timeout=10).status_code == 202
            for loop in (topics, moods):
                assert all(job["state"] == "finished" for job in loop.wait_idle(300))
            t_versions, m_versions = topics.versions(), moods.versions()
            assert t_versions["current"].startswith("p11-v") and m_versions["current"].startswith("p12-v")
            assert set(t_versions["versions"][-1]["labels"]["topic"]) == set(AGNEWS_LABELS)
            assert m_versions["versions"][-1]["labels"] == {"sentiment": ["Positive", "Negative"]}
            assert {p.name for p in (tmp_path / "models" / "projects").iterdir()} == {topics.key, moods.key}
            time.sleep(1.5)
            result = moods.predict(["A wonderful, moving film"])[0]
            assert result["result"][0]["from_name"] == "sentiment"
            assert result["model_version"] == m_versions["current"]
    finally:
        for worker in workers:
            stop(worker)


def test_the_schedules_slots_keep_their_place_and_missed_ones_run_once():
    from ls_backend.jobs import schedule_after, slot_mark

    assert schedule_after(None, 100.0) is None
    assert schedule_after("3600", 100.0) == 3700.0
    assert time.gmtime(schedule_after("0 * * * *", 1_800_000_000.0)).tm_min == 0  # cron: the next full hour
    assert slot_mark("3600", 3700.0, 3705.0) == 3700.0  # fired 5 s late: the next slot stays at 7300
    assert slot_mark("3600", 3700.0, 9000.0) == 9000.0  # slots missed: one run now, the next an hour on


def schedule_env(tmp_path, monkeypatch, **extra) -> Settings:
    """A store with one project that has a label not trained on (3) and one without labels (4)."""
    from ls_backend.store import CorrectionStore

    from .support.events import annotation_event, choices, project

    for name, value in {"MODEL_DIR": str(tmp_path), "REDIS_URL": "", "TRAIN_SCHEDULE": "10", "TRAIN_MODE": "frozen",
                        "JOB_STANDBY": "false", "TRAIN_EVERY": "0", **extra}.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    store = CorrectionStore.from_settings(settings)
    try:
        store.record_event(annotation_event(1, 1, choices("World"), proj=project(3)))
        store.record_event({"action": "PROJECT_UPDATED", "project": project(4)})
    finally:
        store.close()
    return settings


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return value


def test_the_embedded_schedule_counts_from_its_last_run_across_runners(tmp_path, monkeypatch):
    """TRAIN_SCHEDULE=60 with the embedded runner: a new MODEL_DIR marks its first start (restarts
    count from it, so a runner restarted more often than the interval still reaches it); a slot
    that is due fires once; a runner that was waiting for the flock and takes over does not fire
    it again."""
    from ls_backend.jobs import JobRunner

    from .support.events import key_of

    settings = schedule_env(tmp_path, monkeypatch, TRAIN_SCHEDULE="60")  # no slot reached by a slow start
    mark = tmp_path / ".schedule-last"

    def start(runner):
        thread = threading.Thread(target=runner.run_forever, daemon=True)
        thread.start()
        return thread

    def stop(runner, thread):
        runner.stop()
        thread.join(60)
        assert not thread.is_alive()

    def scheduled():
        return {job.id for job in EmbeddedTrainingQueue(settings).jobs() if job.trigger == "schedule"}

    first = JobRunner(settings)
    thread = start(first)
    started = float(wait_for(lambda: mark.exists() and mark.read_text(), 10, "no mark at the first start"))
    assert started == pytest.approx(time.time(), abs=5)
    time.sleep(1)
    stop(first, thread)
    assert not scheduled()  # the first start counts the interval; it does not run the schedule
    again = JobRunner(settings)
    thread = start(again)
    time.sleep(2)
    stop(again, thread)
    assert float(mark.read_text()) == started and not scheduled()  # a restart keeps the count

    mark.write_text(f"{time.time() - 59:.3f}\n")  # the slot comes due in about a second
    standby = JobRunner(settings)  # made now, while the slot is still ahead
    running = JobRunner(settings)
    thread = start(running)
    ids = wait_for(scheduled, 15, "the due slot did not fire")
    jobs = EmbeddedTrainingQueue(settings).jobs()
    assert [(job.project, job.lane) for job in jobs] == [(key_of(3), "full")]  # project 4 has no labels
    standby_thread = start(standby)  # waits for the flock
    stop(running, thread)
    time.sleep(4)  # the standby runner has taken over (it polls the flock every second)
    stop(standby, standby_thread)
    assert scheduled() == ids  # the slot ran once


def test_the_rq_scheduler_counts_from_its_last_run_and_fires_each_slot_once(redis_url, queue_name, tmp_path, monkeypatch):
    """``ls-backend scheduler`` (TRAIN_SCHEDULE=60): a start, or a restart, does not run the schedule
    at once; a slot that came due fires once, with two schedulers starting side by side.  The interval
    is long enough that a slow start on a busy machine cannot reach the slot by itself."""
    import redis

    from .support.events import key_of

    settings = schedule_env(tmp_path, monkeypatch, REDIS_URL=redis_url, QUEUE_NAME=queue_name,
                            TRAIN_SCHEDULE="60")
    connection = redis.Redis.from_url(redis_url)
    key = f"{queue_name}:schedule-last"
    env = {name: os.environ[name] for name in ("MODEL_DIR", "REDIS_URL", "QUEUE_NAME", "TRAIN_SCHEDULE", "TRAIN_EVERY")}
    queue = RedisTrainingQueue(settings)
    schedulers = []

    def start():
        full_env = server_environment(dict(HF_HUB_OFFLINE="1", **env))
        with open(tmp_path / f"scheduler-{len(schedulers)}.log", "wb") as log_file:
            process = subprocess.Popen(console_script() + ["scheduler"], env=full_env, cwd=REPO,
                                       stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True)
        schedulers.append(process)
        return process

    def fired(process) -> int:
        return (tmp_path / f"scheduler-{schedulers.index(process)}.log").read_text().count("schedule: queued")

    try:
        first = start()
        started = float(wait_for(lambda: connection.get(key), 30, "no mark at the first start"))
        time.sleep(3)
        first.terminate()
        assert first.wait(30) == 0
        assert queue.jobs() == []  # no run at the first start
        second = start()
        time.sleep(6)  # long enough to start and look
        assert queue.jobs() == [] and float(connection.get(key)) == started  # nor at a restart
        second.terminate()
        assert second.wait(30) == 0
        last = round(time.time() - 61, 3)
        connection.set(key, f"{last:.3f}")  # a slot came due while no scheduler ran
        both = [start(), start()]  # each finds it due at its first look
        jobs = wait_for(queue.jobs, 30, "the due slot did not fire")
        time.sleep(3)
        assert [(job.project, job.trigger, job.lane) for job in queue.jobs()] == [(key_of(3), "schedule", "full")], jobs
        assert float(connection.get(key)) == pytest.approx(last + 60)  # the slot that fired, a minute on
        for process in both:
            process.terminate()
            assert process.wait(30) == 0
        assert sorted(fired(process) for process in both) == [0, 1]  # one of them fired it, once
    finally:
        for process in schedulers:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        for q in queue.queues.values():
            q.empty()
        connection.delete(key)
        queue.close()


def test_a_label_config_that_cannot_be_trained_queues_its_job_once(tmp_path):
    """<Choices> over an <Image>: the job ends "nothing to train" and, its labels not counted as
    seen, queued itself again at its end, for ever (a burst worker never ended; a runner started a
    process importing torch again and again)."""
    from ls_backend.store import CorrectionStore

    from .support.events import annotation_event, choices, key_of, project

    config = ('<View><Image name="image" value="$image"/><Choices name="topic" toName="image">'
              '<Choice value="World"/><Choice value="Sports"/></Choices></View>')
    env = {"MODEL_DIR": str(tmp_path), "REDIS_URL": "", "TRAIN_EVERY": "3", "TRAIN_MODE": "frozen",
           "JOB_STANDBY": "false", "HF_HUB_OFFLINE": "1"}
    settings = Settings.from_env(env)
    queue, store = EmbeddedTrainingQueue(settings), CorrectionStore.from_settings(settings)
    try:
        for n in (1, 2, 3):
            queue.maybe_enqueue(store, store.record_event(annotation_event(n, n, choices("World"), proj=project(7, config))))
        assert [job.state for job in queue.jobs(key_of(7))] == ["queued"]
        done = subprocess.run(console_script() + ["worker", "--burst"], env=server_environment(env), cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        jobs = queue.jobs(key_of(7))
        assert [job.state for job in jobs] == ["finished"], [(job.state, job.error) for job in jobs]
        assert "nothing to train" in jobs[0].result["reason"] and store.labels_since_training(key_of(7)) == 0
    finally:
        store.close()
        queue.close()


def test_labels_that_come_while_a_full_lane_job_runs_get_the_next_full_lane_job(tmp_path):
    """TRAIN_MODE=auto: the fast lane's jobs beside a full-lane one move the project's training mark
    past the labels that came meanwhile; the full-lane job, ending, read that mark and queued nothing,
    so the full model never learned them unless TRAIN_EVERY more labels came."""
    from ls_backend.jobs import FAST, FULL
    from ls_backend.store import CorrectionStore

    from .support.events import annotation_event, choices, key_of

    settings = Settings(model_dir=tmp_path, train_every=3, train_mode="auto", full_min_labels=3)
    queue, store = EmbeddedTrainingQueue(settings), CorrectionStore.from_settings(settings)
    key = key_of(3)

    def label(n):
        queue.maybe_enqueue(store, store.record_event(annotation_event(n, n, choices("World"))))

    def end(job, cutoff):  # what a job does as it ends: its mark, then the runner's check
        store.mark_trained(key, cutoff)
        queue.finish(job.id, {"cutoff_seq": cutoff})
        queue.requeue_if_behind(key, job.lane, {"cutoff_seq": cutoff})

    try:
        for n in (1, 2, 3):
            label(n)
        full = queue.claim(FULL)
        full_cutoff = store.current_seq(key)
        end(queue.claim(FAST), store.current_seq(key))
        for n in (4, 5, 6, 7):  # while the full-lane job runs: a fast-lane job, which takes them all
            label(n)
        end(queue.claim(FAST), store.current_seq(key))
        assert store.labels_since_training(key) == 0
        end(full, full_cutoff)
        queued = [(job.lane, job.trigger) for job in queue.jobs(key) if job.state == "queued"]
        assert queued == [(FULL, "labels")], queued
        end(queue.claim(FULL), store.current_seq(key))  # that one takes them: nothing more to queue
        assert [job for job in queue.jobs(key) if job.state == "queued"] == []
    finally:
        store.close()
        queue.close()


def test_a_burst_worker_does_not_wait_for_another_runner(tmp_path):
    """``ls-backend worker --burst`` (embedded) where another runner holds the flock: it says so
    and exits 1 at once, instead of waiting for the flock for good."""
    import fcntl

    env = server_environment({"MODEL_DIR": str(tmp_path), "REDIS_URL": "", "HF_HUB_OFFLINE": "1"})
    with open(tmp_path / ".job-runner.lock", "a+") as held:  # what a running runner holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = subprocess.run(console_script() + ["worker", "--burst"], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "another job runner serves" in done.stderr and ".job-runner.lock" in done.stderr
    # with the flock free, a burst runs the (empty) queue and ends
    done = subprocess.run(console_script() + ["worker", "--burst"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_fast_lane_jobs_run_in_processes_started_ahead(tmp_path):
    """While the fast lane waits, the runner starts its next job process, which imports the job's
    code before the job arrives; each job still gets a process of its own."""
    env = {"TRAIN_EVERY": "8", "TRAIN_MODE": "frozen", "REDIS_URL": "", "SYNC_CHECK_INTERVAL": "0", "JOB_STANDBY": "true"}
    with BackendServer(tmp_path / "models", env=env) as server:
        loop = LoopClient(server.url, project_id=5)
        loop.setup()
        rows = balanced_agnews(4)
        loop.label(rows[:8])
        first = loop.wait_idle(timeout=300)
        time.sleep(2)  # the lane is idle again: its next process is started ahead
        loop.label(rows[8:], first_annotation_id=9)
        deadline = time.monotonic() + 300
        while len(jobs := loop.jobs()) < 2 or any(job["state"] not in ("finished", "failed") for job in jobs):
            assert time.monotonic() < deadline, jobs
            time.sleep(0.5)
    assert len(first) == 1 and {job["state"] for job in jobs} == {"finished"}, jobs
    processes = [job["result"]["process"] for job in sorted(jobs, key=lambda job: job["enqueued_at"])]
    assert all(p["started_ahead"] for p in processes), processes
    assert processes[0]["pid"] != processes[1]["pid"]  # one process per job, as before
    # the second process had finished its imports before its labels came
    assert processes[1]["waited_for_job_s"] > 0, processes


def test_a_dead_standby_process_is_replaced_and_the_job_still_runs(tmp_path):
    from ls_backend.jobs import FAST, JobRunner

    settings = Settings(model_dir=tmp_path, train_mode="frozen")
    runner = JobRunner(settings)
    runner._stand_by(FAST)
    first, _ = runner._standby[FAST]
    first.kill()
    first.join(10)
    runner._stand_by(FAST)  # the waiting lane notices and starts another
    standby, _ = runner._standby[FAST]
    assert standby.pid != first.pid and standby.is_alive()
    standby.kill()  # and this one dies just before a job comes
    standby.join(10)
    job, created = runner.queue.enqueue("8.1", "labels", FAST)
    assert created
    claimed = runner.queue.claim(FAST)
    assert claimed is not None and claimed.id == job.id
    runner.run_one(claimed)
    done = runner.queue.get(job.id)
    assert FAST not in runner._standby  # used up: the lane starts the next one when it waits again
    assert done.state == "finished", (done.state, done.error)
    assert done.result["process"]["started_ahead"] is False and done.result["process"]["pid"] != standby.pid


def test_a_failure_of_the_runner_loop_does_not_end_the_lane(tmp_path, monkeypatch):
    """A database blip or a failed process start in the lane's loop: the lane goes on, and a job
    it had claimed is retried rather than left "running" for ever."""
    import sqlite3

    from ls_backend.jobs import FAST, JobRunner

    runner = JobRunner(Settings(model_dir=tmp_path, train_mode="frozen", job_standby=False), poll=0.01)
    job, _ = runner.queue.enqueue("8.1", "labels", FAST)
    claim, calls, pauses = runner.queue.claim, {"claim": 0, "run": 0}, []

    def flaky_claim(lane):
        calls["claim"] += 1
        if calls["claim"] == 1:
            raise sqlite3.OperationalError("database is locked")
        return claim(lane)

    def run_one(claimed):
        calls["run"] += 1
        if calls["run"] == 1:
            raise OSError("cannot start the job process")
        runner.queue.finish(claimed.id, {"version": "p8-v1"})

    monkeypatch.setattr(runner.queue, "claim", flaky_claim)
    monkeypatch.setattr(runner, "run_one", run_one)
    monkeypatch.setattr(runner.stopping, "wait", lambda timeout=None: pauses.append(timeout) or False)
    runner._lane(FAST, burst=True)
    done = runner.queue.get(job.id)
    assert done.state == "finished" and done.attempts == 2, done
    assert pauses == [2.0, 4.0]  # backs off between failures


def test_an_interrupted_job_process_reports_a_crash_so_the_job_is_retried(tmp_path, monkeypatch):
    """Ctrl-C in the terminal reaches the job process too: its job must be retried, as for any
    stop of the runner, not failed for good."""
    import multiprocessing

    from ls_backend import jobs

    monkeypatch.setattr(jobs, "warm_imports", lambda settings: 0.0)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "execute_training", interrupted)
    settings = Settings(model_dir=tmp_path)
    job, _ = jobs.EmbeddedTrainingQueue(settings).enqueue("8.1", "labels")
    ours, theirs = multiprocessing.Pipe()
    ours.send(job)
    jobs._job_process(settings, theirs, ahead=False)
    kind, reason = ours.recv()
    assert kind == "interrupted" and "KeyboardInterrupt" in reason  # run_one: a stop, else a crash (retried)


def test_ctrl_c_during_a_job_puts_it_back_in_its_place_without_using_a_retry(tmp_path, monkeypatch):
    """Ctrl-C reaches the runner and its job process together: the job process's report came first,
    and the job was handled as a crash (a retry used; with JOB_RETRIES=0 failed for good)."""
    from ls_backend.jobs import FULL, JobRunner

    class Child:
        exitcode = 0

        def is_alive(self):
            return False

        def join(self, timeout=None):
            pass

    class Interrupted:  # what the job process sends on KeyboardInterrupt (above)
        def poll(self, timeout):
            return True

        def recv(self):
            return ("interrupted", "the job process was interrupted (KeyboardInterrupt)")

        def close(self):
            pass

    for stopping in (True, False):
        runner = JobRunner(Settings(model_dir=tmp_path / str(stopping), job_standby=False, job_retries=0))
        monkeypatch.setattr(runner, "_process_for", lambda lane, job: (Child(), Interrupted()))
        job, _ = runner.queue.enqueue("8.1", "labels", FULL)
        if stopping:  # the runner's own SIGINT handler
            threading.Timer(0.2, runner.stop).start()
        runner.run_one(runner.queue.claim(FULL))
        after = runner.queue.get(job.id)
        # with the runner stopping: queued again, the attempt refunded; the job process alone: a crash
        assert (after.state, after.attempts) == (("queued", 0) if stopping else ("failed", 1)), after
        runner.queue.close()


@pytest.mark.parametrize("stop", ["terminate", "kill"])
def test_a_job_process_stopped_by_its_runner_lets_go_of_the_projects_sync_lease(tmp_path, monkeypatch, stop):
    """The runner stops its job process with SIGTERM: in Start Training's sync, the process died
    holding the project's sync lease, so the job's rerun after the restart waited 5 minutes for it,
    and Start Training meanwhile synced nothing.  Killed (SIGKILL: ``JOB_TIMEOUT``, the OOM
    killer), it cannot let go: its lease is free at once, as its holder is gone."""
    import multiprocessing

    from ls_backend import jobs, sync
    from ls_backend.store import CorrectionStore

    from .support.events import annotation_event, choices, key_of, project

    monkeypatch.setattr(jobs, "warm_imports", lambda settings: 0.0)
    syncing = multiprocessing.get_context("fork").Event()

    def slow_sync(*args, **kwargs):
        syncing.set()
        time.sleep(60)

    monkeypatch.setattr(sync, "sync_project", slow_sync)
    settings = Settings(model_dir=tmp_path, label_studio_url="http://127.0.0.1:9", label_studio_api_key="k")
    key = key_of(3)
    store = CorrectionStore.from_settings(settings)
    store.record_event(annotation_event(1, 1, choices("World"), proj=project(3)))
    job, _ = jobs.EmbeddedTrainingQueue(settings).enqueue(key, "START_TRAINING")
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    child = context.Process(target=jobs._job_process, args=(settings, theirs, False))
    child.start()
    try:
        ours.send(job)
        assert syncing.wait(60), "the job never reached its sync"
        assert not store.claim_sync(key, 900)  # the job holds the lease
        getattr(child, stop)()  # as the runner stops it, or kills it
        child.join(30)
        assert store.claim_sync(key, 900)  # let go: the next sync (the rerun's) takes it at once
    finally:
        if child.is_alive():
            child.kill()
        store.close()


def test_the_train_command_says_what_went_wrong_in_its_exit_code(tmp_path, monkeypatch, capsys):
    from ls_backend import cli
    from ls_backend.store import CorrectionStore

    from .support.events import annotation_event, choices, key_of, project

    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("REDIS_URL", "")
    store = CorrectionStore.from_settings(Settings.from_env())
    try:
        store.record_event(annotation_event(1, 1, choices("World"), proj=project(3)))
    finally:
        store.close()
    assert cli.main(["train", "--project", "99"]) == 1  # a mistyped project: a message, no traceback
    assert "no project '99'" in capsys.readouterr().err
    # no runner takes the job: --wait gives up after --timeout, and that is not a success
    assert cli.main(["train", "--project", "3", "--wait", "--timeout", "0.5"]) == 1
    captured = capsys.readouterr()
    assert "is still queued after 0.5 s" in captured.err
    assert json.loads(captured.out)["project"] == key_of(3)
    # a plot that cannot be written: a message, no traceback
    assert cli.main(["curve", "--project", "3", "--png", str(tmp_path / "no" / "such" / "folder.png")]) == 1
    assert "cannot write the plot" in capsys.readouterr().err


def test_a_job_runner_that_keeps_dying_soon_after_start_is_restarted_with_a_growing_pause(monkeypatch):
    from ls_backend.cli import EmbeddedRunnerProcess

    class DiesAfterOneCheck:
        returncode = 1

        def __init__(self):
            self.checks = 0

        def poll(self):
            self.checks += 1
            return None if self.checks == 1 else 1

    supervisor = EmbeddedRunnerProcess()
    supervisor.process = DiesAfterOneCheck()
    monkeypatch.setattr(supervisor, "_spawn", DiesAfterOneCheck)
    pauses = []
    monkeypatch.setattr(supervisor.stopping, "wait", lambda delay: pauses.append(delay) or len(pauses) > 12)
    monkeypatch.setattr(supervisor.stopping, "is_set", lambda: False)
    supervisor._supervise()
    assert pauses[-1] == 30.0 and pauses == sorted(pauses), pauses  # 1, 2, 4, ... up to 30 s


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def _ends_after_its_parent_is_killed(parent: subprocess.Popen, pid: int, within: float) -> bool:
    """SIGKILL ``parent`` (no chance to stop its children); whether ``pid`` ends within ``within``
    seconds.  ``pid`` is killed afterwards either way."""
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + within
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        return not _alive(pid)
    finally:
        parent.kill()
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_job_runner_reaped_by_the_server_is_restarted_too(monkeypatch):
    """gunicorn's master reaps every child that exits, the runner too: ``poll`` then reads 0, as for
    a runner asked to stop. Only the server's own shutdown (``stopping``) means no restart."""
    from ls_backend.cli import EmbeddedRunnerProcess

    class Reaped:
        returncode = 0

        def poll(self):
            return 0

    supervisor = EmbeddedRunnerProcess()
    supervisor.process = Reaped()
    spawned = []
    monkeypatch.setattr(supervisor, "_spawn", lambda: spawned.append(1) or Reaped())
    waits = []
    monkeypatch.setattr(supervisor.stopping, "wait", lambda delay: waits.append(delay) or len(waits) > 3)
    supervisor._supervise()
    assert spawned, "a runner that ended while the server runs was not restarted"
    supervisor.stopping = threading.Event()
    supervisor.stopping.set()  # the server shutting down: no restart
    spawned.clear()
    supervisor._supervise()
    assert spawned == []


def test_a_runner_whose_server_is_killed_hard_stops_instead_of_running_on(tmp_path):
    """The server (here a shell standing in for it) killed by SIGKILL cannot stop its runner: the
    runner notices and stops, so it never runs jobs with a dead server's settings."""
    import sys

    from ls_backend.jobs import RUNNER_PARENT_ENV

    script = (f"{sys.executable} -m ls_backend.cli worker & echo $! ; wait")
    env = dict(os.environ, MODEL_DIR=str(tmp_path / "models"), CACHE_DIR=str(tmp_path / "cache"),
               REDIS_URL="", PYTHONPATH=str(REPO))
    server = subprocess.Popen(["bash", "-c", f"export {RUNNER_PARENT_ENV}=$$; {script}"], env=env,
                              stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    runner = int(server.stdout.readline())
    deadline = time.monotonic() + 60
    while not (tmp_path / "models").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)
    assert _alive(runner)  # it runs while its server lives
    assert _ends_after_its_parent_is_killed(server, runner, within=30), "the runner of a killed server kept running"


def test_a_job_stopped_with_its_runner_goes_back_to_the_queue_without_using_a_retry(tmp_path):
    from ls_backend.jobs import EmbeddedTrainingQueue

    queue = EmbeddedTrainingQueue(Settings(model_dir=tmp_path, job_retries=1))
    job, _ = queue.enqueue("3.1", "labels")
    for _ in range(5):  # five deploys while the job runs
        claimed = queue.claim()
        assert claimed is not None and claimed.id == job.id and claimed.attempts == 1
        queue.fail(job.id, "the job runner was stopped", retry=True, refund=True)
    claimed = queue.claim()
    queue.fail(job.id, "the job process died", retry=True)  # a crash counts
    assert queue.get(job.id).state == "queued"
    queue.claim()
    queue.fail(job.id, "the job process died", retry=True)
    assert queue.get(job.id).state == "failed"


def test_waiting_for_a_job_follows_it_to_the_job_that_became_its_retry(tmp_path):
    """``ls-backend train --wait``: the job crashed while another job of its project and lane was
    queued, which became its retry; the wait ended at once with exit 1 while the work went on."""
    from ls_backend.jobs import EmbeddedTrainingQueue

    queue = EmbeddedTrainingQueue(Settings(model_dir=tmp_path, job_retries=2))
    job, _ = queue.enqueue("3.1", "manual")
    assert queue.claim().id == job.id
    newer, created = queue.enqueue("3.1", "labels")  # queued while it runs
    assert created
    queue.fail(job.id, "the job process died", retry=True)
    assert queue.get(job.id).error.endswith(f"(retried as {newer.id})")

    def run_the_retry():
        time.sleep(0.5)
        assert queue.claim().id == newer.id
        queue.finish(newer.id, {"promoted": True})

    threading.Thread(target=run_the_retry, daemon=True).start()
    waited = queue.wait(job.id, 10, poll=0.05)
    assert waited.id == newer.id and waited.state == "finished"


def test_a_job_stopped_by_a_deploy_keeps_its_place_and_a_crashed_one_goes_behind(tmp_path):
    """Stopped by a deploy, a job went behind every job queued while it ran, and GET /jobs showed a
    queue time it never had."""
    from ls_backend.jobs import EmbeddedTrainingQueue

    queue = EmbeddedTrainingQueue(Settings(model_dir=tmp_path, job_retries=2))
    first, _ = queue.enqueue("1.1", "START_TRAINING")
    assert queue.claim().id == first.id
    later = [queue.enqueue(f"{n}.1", "labels")[0].id for n in (2, 3)]
    queue.fail(first.id, "the job runner was stopped", retry=True, refund=True)
    assert queue.get(first.id).enqueued_at == first.enqueued_at
    assert queue.claim().id == first.id  # its place, ahead of the jobs queued after it
    queue.fail(first.id, "the job process died", retry=True)  # a crash: behind them
    assert [queue.claim().id for _ in range(3)] == later + [first.id]


def test_a_job_process_is_killed_when_the_runner_loses_track_of_it(tmp_path, monkeypatch):
    """The lane retries a job whose runner failed: the first process must not go on training beside the retry."""
    from ls_backend.jobs import FAST, JobRunner

    class Child:
        killed = False
        exitcode = None

        def kill(self):
            self.killed = True

        def join(self, timeout=None):
            pass

    class BrokenPipe:
        def poll(self, timeout):
            raise OSError("the pipe broke")

    runner = JobRunner(Settings(model_dir=tmp_path, job_standby=False))
    child = Child()
    monkeypatch.setattr(runner, "_process_for", lambda lane, job: (child, BrokenPipe()))
    job, _ = runner.queue.enqueue("8.1", "labels", FAST)
    with pytest.raises(OSError):
        runner.run_one(runner.queue.claim(FAST))
    assert child.killed


def test_a_job_process_ends_when_its_runner_is_killed_hard():
    """SIGKILL leaves a runner no chance to stop its job process: the process notices it was
    orphaned and ends, instead of training beside the retry of a restarted runner."""
    import sys
    from pathlib import Path

    from tests.support.orphans import PARENT

    runner = subprocess.Popen([sys.executable, "-c", PARENT, str(Path(__file__).resolve().parents[1])],
                              stdout=subprocess.PIPE, text=True)
    child = int(runner.stdout.readline())
    time.sleep(1.0)
    assert _alive(child)  # it waits while its runner lives
    assert _ends_after_its_parent_is_killed(runner, child, within=10), "the orphaned job process kept running"


def test_an_rq_job_that_fails_while_a_newer_one_waits_hands_it_its_trigger_instead_of_a_retry(
        redis_url, queue_name, tmp_path, monkeypatch):
    """Start Training's job fails (a CUDA out-of-memory, say) after a label queued the project's next
    job: rq retried it as a job of its own, so two trainings followed, and the one that ran first
    had no sync.  The queued job takes its trigger, as in the embedded queue."""
    from rq import SimpleWorker

    from ls_backend import jobs

    for name, value in {"REDIS_URL": redis_url, "QUEUE_NAME": queue_name, "MODEL_DIR": str(tmp_path),
                        "JOB_RETRIES": "1", "TRAIN_EVERY": "0"}.items():
        monkeypatch.setenv(name, value)
    queue = RedisTrainingQueue(Settings.from_env())
    runs = []

    def training(settings, project, trigger, progress=None, lane="full"):
        runs.append(trigger)
        if len(runs) == 1:
            newer, created = queue.enqueue(project, "labels", lane)  # a label while it runs
            assert created
            raise RuntimeError("CUDA out of memory")
        return {"version": "p5-v2", "promoted": True}

    monkeypatch.setattr(jobs, "execute_training", training)
    try:
        first, _ = queue.enqueue("5.1", "START_TRAINING")
        SimpleWorker([queue.queue], connection=queue.connection).work(burst=True)
        assert runs == ["START_TRAINING", "START_TRAINING"]  # the queued job ran once, with the sync
        by_id = {job.id: job for job in queue.jobs("5.1")}
        assert len(by_id) == 2 and by_id[first.id].state == "failed", by_id
        newer = next(job for job in by_id.values() if job.id != first.id)
        assert newer.state == "finished" and newer.trigger == "START_TRAINING"
        assert "CUDA out of memory" in by_id[first.id].error and f"retried as {newer.id}" in by_id[first.id].error
        assert by_id[first.id].attempts == 1  # it ran once (the status said 3: rq's retries zeroed)
        assert not queue.queue.scheduled_job_registry.get_job_ids()  # no retry of the failed one waits
    finally:
        _clear(queue)


def test_a_trigger_joins_the_retry_rq_makes_of_a_job_whose_worker_died(redis_url, queue_name, tmp_path):
    """A worker SIGKILLed mid-job: rq finds the job abandoned and retries it by itself, without the
    queued marker the job's start removed, so the next trigger queued a second job beside it."""
    from rq.job import Job

    settings = Settings(model_dir=tmp_path, redis_url=redis_url, queue_name=queue_name, job_retries=2)
    queue = RedisTrainingQueue(settings)
    try:
        job, _ = queue.enqueue("5.1", "START_TRAINING")
        assert queue.queue.pop_job_id() == job.id  # a worker takes it ...
        queue.release_queued("5.1", job.id)  # ... and starts it (train_project), then dies
        with queue.connection.pipeline() as pipe:  # what rq's cleanup of an abandoned job does
            Job.fetch(job.id, connection=queue.connection).retry(queue.queue, pipe)
            pipe.execute()
        again, created = queue.enqueue("5.1", "labels")
        assert not created and again.id == job.id and again.trigger == "START_TRAINING", again
        assert [j.id for j in queue.jobs("5.1")] == [job.id]
        other_lane, created = queue.enqueue("5.1", "labels", "fast")  # the other lane's job is its own
        assert created and other_lane.id != job.id
    finally:
        _clear(queue)


def test_the_wait_for_a_projects_lock_does_not_count_against_job_timeout(redis_url, queue_name, tmp_path, monkeypatch):
    """Two workers, one project: the second job waits for the first one's lock. JOB_TIMEOUT counts
    from the lock on, so waiting 6 s and then training 6 s passes a 10 s JOB_TIMEOUT, while training
    12 s after the lock is still stopped (an in-process rq worker, with rq's own timeout)."""
    import redis
    from rq import SimpleWorker
    from rq.job import Job

    from ls_backend import jobs

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("QUEUE_NAME", queue_name)
    monkeypatch.setenv("JOB_TIMEOUT", "10")
    monkeypatch.setenv("JOB_RETRIES", "0")
    monkeypatch.setenv("TRAIN_EVERY", "0")
    settings = Settings.from_env()
    queue = RedisTrainingQueue(settings)
    connection = redis.Redis.from_url(redis_url)
    outcomes = {}
    try:
        for project, held, runs in (("5.1", 6.0, 6.0), ("6.1", 2.0, 12.0)):
            monkeypatch.setattr(jobs, "execute_training", lambda *args, runs=runs: time.sleep(runs) or {"trained": True})
            lock = connection.lock(queue.key("lock:full", project), timeout=60, thread_local=False)
            assert lock.acquire(blocking=False)  # the job of another worker holds the project
            threading.Timer(held, lock.release).start()
            info, _ = queue.enqueue(project, "manual")
            started = time.monotonic()
            SimpleWorker([queue.queues["full"]], connection=queue.connection).work(burst=True)
            status = Job.fetch(info.id, connection=queue.connection).get_status(refresh=True)
            outcomes[project] = (getattr(status, "value", status), round(time.monotonic() - started))
        assert outcomes["5.1"][0] == "finished", outcomes  # 12 s in all, 6 of them waiting
        assert outcomes["6.1"][0] == "failed" and outcomes["6.1"][1] < 14, outcomes  # stopped 10 s after the lock
    finally:
        for q in queue.queues.values():
            q.empty()
        queue.close()
        connection.close()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _runner_of(server: BackendServer) -> list[int]:
    return [pid for pid in _children(server.process.pid)
            if "ls_backend.cli" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]


def test_serve_restarts_its_job_runner_after_it_is_killed_and_the_next_job_runs(tmp_path):
    env = {"TRAIN_EVERY": "0", "TRAIN_MODE": "frozen", "WEB_WORKERS": "1"}
    with BackendServer(tmp_path / "models", env=env) as server:
        deadline = time.monotonic() + 60
        while not _runner_of(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        (first,) = _runner_of(server)
        os.kill(first, signal.SIGKILL)  # the OOM killer, say
        deadline = time.monotonic() + 60
        while _runner_of(server) in ([], [first]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _runner_of(server) not in ([], [first]), "serve did not start a new job runner"
        loop = LoopClient(server.url, project_id=9)
        assert loop.setup() == "p9-v0"
        loop.label(balanced_agnews(8))
        response = requests.post(f"{server.url}/projects/{loop.key}/train", timeout=10)
        job = _job_when_done(server.url, response.json()["job"]["id"], timeout=180)
        assert job["state"] == "finished", job


def test_a_job_runner_asked_to_stop_is_not_restarted(tmp_path):
    """SIGTERM (an operator, or Ctrl-C reaching the whole process group): the runner says it was
    asked, and serve leaves it stopped; only a runner that died is started again."""
    with BackendServer(tmp_path / "models", env={"TRAIN_EVERY": "0", "WEB_WORKERS": "1"}) as server:
        deadline = time.monotonic() + 60
        while not _runner_of(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        (first,) = _runner_of(server)
        os.kill(first, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(first) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(4.0)  # past the supervisor's check (every second)
        assert _runner_of(server) == [], "a runner asked to stop was started again"
        assert requests.get(f"{server.url}/health", timeout=5).status_code == 200


def test_a_retried_job_shows_no_progress_of_the_attempt_that_died(tmp_path):
    queue = EmbeddedTrainingQueue(Settings(model_dir=tmp_path, job_retries=1))
    job, _ = queue.enqueue("5.1", "labels")
    assert queue.claim().id == job.id
    queue.set_progress(job.id, {"stage": "fine-tune", "step": 480, "steps": 500})
    queue.fail(job.id, "the job process died (exit code -9)", retry=True)
    assert (queue.get(job.id).state, queue.get(job.id).progress) == ("queued", {})  # as rq shows a retry
    queue.set_progress(job.id, {"stage": "fine-tune", "step": 480, "steps": 500})  # (a write that came late)
    assert queue.claim().progress == {}


def test_an_rq_job_that_trained_stays_finished_when_the_look_ahead_fails(redis_url, queue_name, tmp_path, monkeypatch):
    """After the job, the check for labels past its cut-off reads the store; where that failed, rq
    failed the job and retried it: a second training of a version already live."""
    from rq import SimpleWorker

    from ls_backend import jobs

    env = {"REDIS_URL": redis_url, "QUEUE_NAME": queue_name, "MODEL_DIR": str(tmp_path), "JOB_RETRIES": "2",
           "TRAIN_EVERY": "10", "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"}  # nothing listens on port 1
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runs = []

    def trained(settings, project_key, trigger, progress=None, lane="full"):
        runs.append(project_key)
        return {"project": project_key, "version": "p5-v2", "promoted": True, "cutoff_seq": 5}

    monkeypatch.setattr(jobs, "execute_training", trained)
    queue = RedisTrainingQueue(Settings.from_env())
    try:
        job, _ = queue.enqueue("5.1", "api")
        SimpleWorker([queue.queues["full"]], connection=queue.connection).work(burst=True, with_scheduler=False)
        done = queue.get(job.id)
        assert runs == ["5.1"] and done.state == "finished" and done.result["version"] == "p5-v2", done
        assert queue.get("not an id") is None and queue.get("é") is None  # rq refuses such ids: no job, not a 500
    finally:
        _clear(queue)


def test_labels_only_the_fast_lane_refitted_on_still_reach_the_full_lane(tmp_path, monkeypatch):
    """The fast lane's refits move the project's training mark. A refresh-only job (GET /next) in the
    full lane held off the label trigger while it ran, then, having no cut-off of its own, read that
    mark and queued nothing; the schedule read it too, and never fired under TRAIN_MODE=auto."""
    from ls_backend.jobs import FAST, FULL, REFRESH_TRIGGER, scheduled_training
    from ls_backend.store import CorrectionStore

    from .support.events import annotation_event, choices, key_of

    for name, value in {"MODEL_DIR": str(tmp_path), "REDIS_URL": "", "TRAIN_EVERY": "3", "TRAIN_MODE": "auto",
                        "FULL_MIN_LABELS": "3"}.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    queue, store = EmbeddedTrainingQueue(settings), CorrectionStore.from_settings(settings)
    key = key_of(3)

    def label(n):
        queue.maybe_enqueue(store, store.record_event(annotation_event(n, n, choices("World"))))

    def end(job, result):  # what a job and its runner do at its end
        if "cutoff_seq" in result:
            store.mark_trained(key, result["cutoff_seq"], full_lane=job.lane == FULL)
        queue.finish(job.id, result)
        queue.requeue_if_behind(key, job.lane, result)

    try:
        for n in (1, 2, 3):
            label(n)
        for lane in (FAST, FULL):
            end(queue.claim(lane), {"cutoff_seq": store.current_seq(key)})
        assert store.labels_since_full_training(key) == 0 and scheduled_training([key]) == []
        queue.enqueue(key, REFRESH_TRIGGER)
        refresh = queue.claim(FULL)
        for n in (4, 5, 6):  # while the refresh runs: the fast lane only
            label(n)
        end(queue.claim(FAST), {"cutoff_seq": store.current_seq(key)})
        assert store.labels_since_training(key) == 0 and store.labels_since_full_training(key) == 3
        end(refresh, {"project": key, "state": "finished"})  # a refresh's result: no cut-off
        assert [(j.lane, j.trigger) for j in queue.jobs(key) if j.state == "queued"] == [(FULL, "labels")]
        queue.finish(queue.claim(FULL).id, {})  # (that job, run elsewhere)
        assert scheduled_training([key]) == [key]  # the schedule sees them too
    finally:
        store.close()


def test_a_fast_lane_job_moves_the_projects_mark_and_not_the_full_lanes(tmp_path):
    from ls_backend.finetune import FineTuneJob, NothingToTrain
    from ls_backend.store import CorrectionStore

    from .support.events import annotation_event, choices, key_of

    settings = Settings(model_dir=tmp_path, max_length=64, eval_min=1000)
    store = CorrectionStore.from_settings(settings)
    key = key_of(3)
    try:
        labeled = [("Stocks fell as oil rose", "Business"), ("The striker scored twice", "Sports"),
                   ("Intel unveils a faster chip", "Sci/Tech"), ("Rebels seize a town", "World"),
                   ("The bank holds its rates", "Business"), ("Coach sacked after the defeat", "Sports"),
                   ("NASA probe reaches Mars", "Sci/Tech"), ("Parliament passes the budget", "World")]
        for n, (text, label) in enumerate(labeled):
            store.record_event(annotation_event(n + 1, n + 1, choices(label), text=text))
        FineTuneJob(settings, store, mode="frozen").run(key)
        assert (store.labels_since_training(key), store.labels_since_full_training(key)) == (0, 8)
        # a full-lane job (below FULL_MIN_LABELS on a CPU: heads only, as the fast lane fitted them)
        with pytest.raises(NothingToTrain):
            FineTuneJob(settings, store).run(key)
        assert store.labels_since_full_training(key) == 0  # seen all the same
    finally:
        store.close()


def test_an_rq_work_horse_ends_when_its_worker_is_killed_hard(tmp_path):
    """rq puts each work horse in a process group of its own: a worker killed with SIGKILL left its
    horse training, and renewing the project's lock, while rq retried the job it found abandoned."""
    import sys

    script = tmp_path / "worker.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from ls_backend import jobs\n"
        "os.environ[jobs.RQ_WORKER_PID] = str(os.getpid())  # as run_rq_worker does\n"
        "horse = os.fork()\n"
        "if horse == 0:\n"
        "    os.setpgrp()  # as rq does\n"
        "    print('watching' if jobs.watch_rq_worker() else 'not watching', flush=True)\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(horse, flush=True)\n"
        "time.sleep(60)\n"
    )
    worker = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        lines = [worker.stdout.readline().strip() for _ in range(2)]
        horse = int(next(line for line in lines if line.isdigit()))
        assert "watching" in lines
        worker.kill()
        worker.wait(10)

        def horse_gone():
            try:
                return Path(f"/proc/{horse}/status").read_text().split("State:")[1].split()[0] in ("Z", "X")
            except (FileNotFoundError, IndexError):
                return True

        wait_for(horse_gone, 10, "the horse to end with its worker")
    finally:
        worker.kill()


def test_labels_that_came_while_a_job_failed_for_good_get_a_job_of_their_own(tmp_path):
    """Labels that come while a lane's job runs queue nothing: the job queues their job as it ends.
    It did so only when it succeeded: a refresh-only job (``GET /next``) that failed because Label
    Studio answered 503 left the session's last labels untrained until someone labeled again."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from ls_backend.jobs import FULL, REFRESH_TRIGGER, JobRunner
    from ls_backend.store import CorrectionStore

    from .support.events import annotation_event, choices, key_of, project

    asked, answer = threading.Event(), threading.Event()

    class Unavailable(BaseHTTPRequestHandler):  # Label Studio, busy, then down
        def do_GET(self):
            asked.set()
            answer.wait(60)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PATCH = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = Settings(model_dir=tmp_path, train_mode="full", train_every=5, job_standby=False,
                        label_studio_url=f"http://127.0.0.1:{server.server_port}", label_studio_api_key="k")
    store, runner = CorrectionStore.from_settings(settings), JobRunner(settings)
    key = key_of(3)
    try:
        store.record_event(annotation_event(1, 1, choices("World"), proj=project(3)))
        store.mark_trained(key, store.current_seq(key))
        job, _ = runner.queue.enqueue(key, REFRESH_TRIGGER)
        running = threading.Thread(target=runner.run_one, args=(runner.queue.claim(FULL),))
        running.start()
        assert asked.wait(60), "the job never asked Label Studio"
        for n in range(2, 10):  # 8 labels while it runs (TRAIN_EVERY=5): each joins the running job
            assert runner.queue.maybe_enqueue(store, store.record_event(
                annotation_event(n, n, choices("Sports"), proj=project(3)))) is None
        answer.set()
        running.join(120)
        assert runner.queue.get(job.id).state == "failed"
        queued = [(j.lane, j.trigger) for j in runner.queue.jobs(key) if j.state == "queued"]
        assert queued == [(FULL, "labels")], queued
    finally:
        answer.set()
        server.shutdown()
        store.close()
        runner.queue.close()


def test_labels_that_came_while_an_rq_job_failed_for_good_get_a_job_of_their_own(
        redis_url, queue_name, tmp_path, monkeypatch):
    from rq import SimpleWorker

    from ls_backend import jobs
    from ls_backend.store import CorrectionStore

    from .support.events import annotation_event, choices, key_of, project

    for name, value in {"REDIS_URL": redis_url, "QUEUE_NAME": queue_name, "MODEL_DIR": str(tmp_path),
                        "JOB_RETRIES": "0", "TRAIN_EVERY": "2", "TRAIN_MODE": "full"}.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    queue, store, key = RedisTrainingQueue(settings), CorrectionStore.from_settings(settings), key_of(3)
    runs = []

    def training(settings, project_key, trigger, progress=None, lane="full"):
        runs.append(trigger)
        if len(runs) == 1:
            for n in (1, 2, 3):  # labels while it runs: they wait for it
                assert queue.maybe_enqueue(store, store.record_event(
                    annotation_event(n, n, choices("World"), proj=project(3)))) is None
            raise RuntimeError("Label Studio answered 503")
        return {"version": "p3-v1", "promoted": True, "cutoff_seq": store.current_seq(project_key)}

    monkeypatch.setattr(jobs, "execute_training", training)
    try:
        queue.enqueue(key, "refresh")
        SimpleWorker([queue.queues["full"]], connection=queue.connection).work(burst=True)
        assert runs == ["refresh", "labels"]  # the labels' job, queued as the failed one ended
    finally:
        store.close()
        _clear(queue)
