"""The image's HEALTHCHECK: GET /readyz on the local server; exit 0 on 200, 1 otherwise.

The request names the first configured allowed host (Django refuses any other Host header), so the probe passes
the same checks as a real request. Standard library only: the image has no curl.
"""

import http.client
import os
import sys


def main() -> int:
    hosts = [h.strip() for h in os.environ.get("CESAFLOW_ALLOWED_HOSTS", "").split(",") if h.strip()]
    host = next((h.lstrip(".") for h in hosts if h != "*"), "localhost")
    port = int(os.environ.get("CESAFLOW_HEALTHCHECK_PORT", "8000"))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=8)
    try:
        conn.request("GET", "/readyz", headers={"Host": host})
        status = conn.getresponse().status
    except OSError as exc:
        print(f"readyz: {exc.__class__.__name__}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if status != 200:
        print(f"readyz: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
