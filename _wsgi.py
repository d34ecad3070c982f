"""The WSGI entry point, for a WSGI server of your own: ``gunicorn _wsgi:app``.

It serves the routes only. ``ls-backend serve`` (the README's way, and the images') does more: it sizes
gunicorn's workers, threads and timeouts from the settings and, without ``REDIS_URL``, starts the embedded
job runner beside the web workers. Under ``gunicorn _wsgi:app`` nothing runs the training jobs but an
``ls-backend worker`` you start yourself: beside it with the same ``MODEL_DIR`` (no ``REDIS_URL``), or on
any machine that shares the Redis (``REDIS_URL``). Without one, jobs stay queued.

Do not run it with ``--preload`` on a GPU machine: the app loads its model at import, and a CUDA context
made in gunicorn's master does not survive the fork into its workers.
"""

import logging

from ls_backend.logs import configure
from ls_backend.settings import Settings

settings = Settings.from_env()
configure(settings.log_level)
if not settings.redis_url:
    logging.getLogger(__name__).warning(
        "no REDIS_URL: gunicorn _wsgi:app starts no job runner, so training jobs stay queued until "
        "`ls-backend worker` runs with the same MODEL_DIR (%s); `ls-backend serve` starts one itself",
        settings.model_dir,
    )

from ls_backend.api import create_app  # noqa: E402  (logging first, then torch)

if settings.torch_threads:  # TORCH_THREADS: torch threads per web worker (without it, torch's own default)
    import torch

    torch.set_num_threads(settings.torch_threads)
app = create_app(settings)
