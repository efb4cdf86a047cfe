"""The ASGI application the browser tests serve: CesaFlow's own, plus its static files.

In production a web server or CDN serves ``collectstatic`` output; plain ``daphne`` does not serve static files at
all, so the pages would load without their CSS and JavaScript modules. Django's ``ASGIStaticFilesHandler`` (what
``runserver`` uses) serves ``/static/`` from the finders and hands everything else, websockets included, to the
real application untouched.
"""

from typing import Any, cast

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

from cesaflow.asgi import application as cesaflow_application

# The stubs want Django's own ASGIHandler; any ASGI callable works (the handler only awaits it).
application = ASGIStaticFilesHandler(cast(Any, cesaflow_application))
