"""Training and registry sub-commands of ``ls-backend`` (worker, scheduler, train, jobs, versions)."""

from __future__ import annotations

import argparse
import json
import sys

from .settings import Settings


def resolve_key(store, registry, key_or_id: str) -> str:
    """A project key from a key or a bare Label Studio id: the store's, else (a project that has
    versions but no stored labels yet) the registry's.  An id that names several projects (of
    several Label Studio instances) raises ``UnknownProject(ambiguous=True)``, wherever they are:
    never one of them picked for the operator."""
    from .store import UnknownProject

    text = str(key_or_id).strip()
    try:
        found = store.resolve_project(key_or_id)
    except UnknownProject as exc:
        if exc.ambiguous:
            raise
        found, unknown = None, exc
    if found is not None and found == text:  # a full key
        return found
    # a bare id: the store's project and the registry's (one that reached the registry by /predict
    # alone, or a store moved to a new DATABASE_URL) must be one and the same
    matches = sorted({k for k in registry.projects() if text in (k, k.split(".")[0])} | ({found} if found else set()))
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UnknownProject(
            f"Label Studio project id {text} is ambiguous here: it names {', '.join(matches)} "
            "(projects of several Label Studio instances); pass the full key", ambiguous=True,
        )
    raise unknown


def _resolve(settings: Settings, key_or_id: str) -> str:
    from .registry import ModelRegistry
    from .store import CorrectionStore

    store = CorrectionStore.from_settings(settings)
    try:
        return resolve_key(store, ModelRegistry(settings.model_dir), key_or_id)
    finally:
        store.close()


def versions_answer(settings: Settings, registry, project_key: str) -> dict:
    """``ls-backend versions`` and ``GET /projects/<key>/versions``: the version that serves as
    ``current`` (and the pointer file's own where it names another: missing, or not loadable)."""
    served, pointer = registry.served_version(project_key), registry.current(project_key)
    answer = {"project": project_key, "current": served, "pinned": registry.pinned(project_key),
              "versions": version_rows(settings, project_key, served)}
    if pointer != served:
        answer["current_pointer"] = pointer
    return answer


def version_rows(settings: Settings, project_key: str, served: str | None = None) -> list[dict]:
    """A project's versions, oldest first, with what an operator wants to see; ``served``: the version
    that serves, where the caller has read it (the stand-in where the pointer names no loadable version)."""
    from .registry import ModelRegistry

    registry = ModelRegistry(settings.model_dir)
    current = served if served is not None else registry.served_version(project_key)
    rows = []
    for info in registry.versions(project_key):
        meta = info.meta
        decision = meta.get("decision") or {}
        rows.append(
            {
                "version": info.name,
                "current": info.name == current,
                "kind": meta.get("kind"),
                "recipe": meta.get("recipe"),
                "parent": meta.get("parent"),
                "created_at": meta.get("created_at"),
                "trigger": meta.get("trigger"),
                "seconds": meta.get("seconds"),  # the job's duration, for fine-tunes
                "data": meta.get("data"),
                "metrics": meta.get("metrics"),
                "promoted": decision.get("promoted", meta.get("kind") in ("cold-start", "config-change", "renumbered")),
                "reason": decision.get("reason"),
                "labels": {name: c.get("labels") for name, c in (meta.get("controls") or {}).items()},
            }
        )
    return rows


def run(args: argparse.Namespace, settings: Settings) -> int:
    from .logs import configure
    from .store import UnknownProject

    configure(settings.log_level)
    try:
        return _run(args, settings)
    except UnknownProject as exc:  # a mistyped --project: say so, no traceback
        print(f"ls-backend: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from .jobs import queue_from_settings, run_embedded_runner, run_rq_scheduler, run_rq_worker

    if args.command == "worker":
        if settings.redis_url:
            lanes = ("fast", "full") if args.lane == "all" else (args.lane,)
            return run_rq_worker(settings, burst=args.burst, lanes=lanes)
        return run_embedded_runner(settings, burst=args.burst)
    if args.command == "scheduler":
        if not settings.redis_url:
            print("ls-backend: without REDIS_URL the job runner started by 'serve' keeps the schedule", file=sys.stderr)
            return 2
        return run_rq_scheduler(settings)
    if args.command in ("rollback", "pin", "curve"):
        return _registry_command(args, settings)
    if args.command == "versions":
        from .registry import ModelRegistry

        project = _resolve(settings, args.project)
        registry = ModelRegistry(settings.model_dir)
        print(json.dumps(versions_answer(settings, registry, project), indent=2))
        return 0
    queue = queue_from_settings(settings)
    try:
        if args.command == "jobs":
            project = _resolve(settings, args.project) if args.project else None
            print(json.dumps({"jobs": [job.to_dict() for job in queue.jobs(project)]}, indent=2))
            return 0
        if args.command == "train":
            project = _resolve(settings, args.project)
            job, created = queue.enqueue(project, "manual", args.lane)
            print(f"{'queued' if created else 'already queued'}: job {job.id} for project {project}", file=sys.stderr)
            if args.wait:
                try:
                    job = queue.wait(job.id, args.timeout)
                except LookupError as exc:  # gone from the queue (a Redis restarted without its data)
                    print(f"ls-backend: {exc}: the queue no longer knows it (was its Redis restarted without its "
                          "data?); queue it again with ls-backend train", file=sys.stderr)
                    return 1
            print(json.dumps(job.to_dict(), indent=2))
            if args.wait and job.state not in ("finished", "failed"):
                print(f"ls-backend: job {job.id} is still {job.state} after {args.timeout:g} s (--timeout)", file=sys.stderr)
                return 1
            return 0 if job.state != "failed" else 1
    finally:
        queue.close()
    return 2


def _registry_command(args: argparse.Namespace, settings: Settings) -> int:
    from .curve import learning_curve, learning_curve_png
    from .registry import ModelRegistry, RegistryError

    registry = ModelRegistry(settings.model_dir)
    project = _resolve(settings, args.project)
    before = registry.served_version(project) if args.command in ("rollback", "pin") else None
    try:
        if args.command == "rollback":
            registry.rollback(project, args.to, pin=args.pin)
        elif args.command == "pin":
            if args.off:
                registry.unpin(project)
            else:
                registry.pin(project, args.version)
        else:
            curve = learning_curve(registry, project)
            if args.png:
                try:
                    with open(args.png, "wb") as handle:
                        handle.write(learning_curve_png(curve))
                except OSError as exc:
                    print(f"ls-backend: cannot write the plot to {args.png}: {exc.strerror or exc}", file=sys.stderr)
                    return 1
            print(json.dumps(curve, indent=2))
            return 0
    except (RegistryError, ValueError) as exc:  # (ValueError: a version's meta.json unreadable)
        print(f"ls-backend: {exc}", file=sys.stderr)
        return 1
    answer = {"project": project, "current": registry.current(project), "pinned": registry.pinned(project)}
    print(json.dumps(refresh_after_switch(settings, registry, project, before, answer), indent=2))
    return 0


def refresh_after_switch(settings: Settings, registry, project: str, before: str | None, answer: dict, queue=None) -> dict:
    """Where a rollback or a pin changed the version that serves, queue a refresh of its predictions
    in Label Studio, which would otherwise show (and order tasks by) the version left until a job
    promotes another: ``refresh_job`` in ``answer``, or ``refresh_error`` where the queue is down (the
    switch stands)."""
    from .jobs import REFRESH_TRIGGER, queue_from_settings, redis_unreachable

    if settings.refresh_max_tasks <= 0 or registry.served_version(project) == before:
        return answer
    own = queue is None
    try:
        queue = queue or queue_from_settings(settings)
        answer["refresh_job"] = queue.enqueue(project, REFRESH_TRIGGER)[0].id
    except redis_unreachable() as exc:
        answer["refresh_job"] = None
        answer["refresh_error"] = (f"the job queue is unreachable ({type(exc).__name__}); queue a refresh later with "
                                   f"GET /projects/{project}/next or ls-backend rank --project {project} --refresh")
    finally:
        if own and queue is not None:
            queue.close()
    return answer
