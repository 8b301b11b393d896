#!/usr/bin/env python3
"""Container HEALTHCHECK: exit 0 when GET /health answers 200 (every engine alive), else 1.

Standard library only (the CPU image has no curl). URL from MOEMIX_HEALTH_URL, default
http://127.0.0.1:8000/health (MOEMIX_HEALTH_URL=http://127.0.0.1:8000/ready checks readiness instead); timeout
MOEMIX_HEALTH_TIMEOUT seconds, default 4 (the server answers probes from memory, ahead of request handling).
"""

import os
import sys
import urllib.error
import urllib.request

URL = os.environ.get("MOEMIX_HEALTH_URL", "http://127.0.0.1:8000/health")


def main() -> int:
    try:
        timeout = float(os.environ.get("MOEMIX_HEALTH_TIMEOUT", "4"))
        with urllib.request.urlopen(URL, timeout=timeout) as r:  # noqa: S310
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
