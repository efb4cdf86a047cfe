"""Settings: the REST API's OpenAPI schema and docs (README "REST API" and "Configuration").

A block of ``cesaflow.settings`` in a module of its own so settings.py stays under 600 lines. settings.py imports
it (and nothing else should), after its environment helpers are defined: the one place that reads the environment
is still the settings package.
"""

from __future__ import annotations

from cesaflow.settings import PRODUCTION, _env_bool

__all__ = ["API_DOCS_PUBLIC"]

# /api/v1/schema/ and /api/v1/docs/ without credentials. Off in production: the schema maps every endpoint for
# whoever asks (an org API key or a dashboard session then reads them). On in development.
API_DOCS_PUBLIC = _env_bool("CESAFLOW_API_DOCS_PUBLIC", not PRODUCTION)
