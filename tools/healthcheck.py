"""Container healthcheck: exit 0 when the stage answers GET /healthz with 2xx, else 1."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

# Written at image build time from the stage's config.DEFAULT_HTTP_PORT.
DEFAULT_PORT_FILE = Path("/app/http-port")


def main() -> int:
    """Probe http://127.0.0.1:$QM_HTTP_PORT/healthz (port defaults to the image's stage port)."""
    port = os.environ.get("QM_HTTP_PORT") or DEFAULT_PORT_FILE.read_text().strip()
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:
            return 0 if 200 <= resp.status < 300 else 1
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"healthcheck {url}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
