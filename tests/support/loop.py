"""Drive the labeling loop over HTTP: labels in by webhook, jobs, versions, predictions out."""

from __future__ import annotations

import time

import requests

from .data import AGNEWS_LABELS, agnews
from .events import TOPIC_CONFIG, annotation_event, choices, key_of, project


def balanced_agnews(per_label: int, split: str = "dev", offset: int = 0) -> list[tuple[int, str, str]]:
    """(row index, text, label) with ``per_label`` rows of each topic, in file order."""
    counts = {label: 0 for label in AGNEWS_LABELS}
    picked = []
    for i, (text, label) in enumerate(agnews(split, 4000, offset=offset)):
        if counts[label] < per_label:
            counts[label] += 1
            picked.append((offset + i, text, label))
        if len(picked) == per_label * len(AGNEWS_LABELS):
            break
    return picked


class LoopClient:
    def __init__(self, url: str, project_id: int = 3, config: str = TOPIC_CONFIG, auth=None):
        self.url = url
        self.project = project(project_id, config)
        self.key = key_of(project_id)
        self.config = config
        self.auth = auth

    def setup(self) -> str:
        response = requests.post(self.url + "/setup", json={"project": self.key, "schema": self.config}, auth=self.auth, timeout=30)
        response.raise_for_status()
        return response.json()["model_version"]

    def label(self, rows: list[tuple[int, str, str]], first_annotation_id: int = 1) -> None:
        for n, (task_id, text, label) in enumerate(rows):
            event = annotation_event(first_annotation_id + n, task_id, choices(label), text=text, proj=self.project)
            response = requests.post(self.url + "/webhook", json=event, auth=self.auth, timeout=5)
            assert response.status_code == 200, response.text

    def predict(self, texts: list[str]) -> list[dict]:
        tasks = [{"id": i, "data": {"text": t}} for i, t in enumerate(texts)]
        response = requests.post(
            self.url + "/predict",
            json={"tasks": tasks, "project": self.key, "label_config": self.config},
            auth=self.auth,
            timeout=300,
        )
        response.raise_for_status()
        return response.json()["results"]

    def accuracy(self, rows: list[tuple[str, str]]) -> tuple[float, set[str]]:
        results = self.predict([t for t, _ in rows])
        hits = sum(r["result"][0]["value"]["choices"][0] == gold for r, (_, gold) in zip(results, rows))
        return hits / len(rows), {r["model_version"] for r in results}

    def jobs(self) -> list[dict]:
        response = requests.get(self.url + "/jobs", params={"project": self.key}, auth=self.auth, timeout=10)
        response.raise_for_status()
        return response.json()["jobs"]

    def versions(self) -> dict:
        response = requests.get(f"{self.url}/projects/{self.key}/versions", auth=self.auth, timeout=10)
        response.raise_for_status()
        return response.json()

    def wait_idle(self, timeout: float = 300) -> list[dict]:
        """Wait until the project has jobs and none is queued or running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs()
            if jobs and all(job["state"] in ("finished", "failed") for job in jobs):
                return jobs
            time.sleep(1)
        raise AssertionError(f"jobs still busy after {timeout}s: {self.jobs()}")
