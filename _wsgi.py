"""The WSGI entry point: ``gunicorn _wsgi:app`` (``ls-backend serve`` does this for you)."""

from ls_backend.logs import configure
from ls_backend.settings import Settings

settings = Settings.from_env()
configure(settings.log_level)

from ls_backend.api import create_app  # noqa: E402  (logging first, then torch)

app = create_app(settings)
