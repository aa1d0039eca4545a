"""layrot.cli: the ``layrot-agent`` command line (operators), on top of client and controllers.

The console entry point is :func:`console_main`. It lives here, not in
``layrot.cli.main``, so that a training image installed without the ``cli``
extra gets one clear line instead of an ImportError traceback: nothing in this
module imports click or any other operator-side dependency.
"""

from __future__ import annotations

import importlib.util
import sys

# Top-level modules of the ``cli`` extra (pyproject.toml) -> their distribution names.
CLI_EXTRA = {
    "click": "click",
    "prometheus_client": "prometheus-client",
    "grpc_health": "grpcio-health-checking",
    "matplotlib": "matplotlib",
}
MISSING_HINT = "layrot-agent needs the cli extra: pip install 'layrot[cli]'"


def missing_cli_dependencies() -> list[str]:
    """Distributions of the ``cli`` extra that cannot be found (located, not imported: cheap)."""
    return [dist for mod, dist in CLI_EXTRA.items() if importlib.util.find_spec(mod) is None]


def console_main(argv: list[str] | None = None) -> None:
    """Console entry point of ``layrot-agent``: checks the ``cli`` extra, then runs the click group."""
    missing = missing_cli_dependencies()
    if missing:
        print(f"{MISSING_HINT} (missing: {', '.join(missing)})", file=sys.stderr)
        sys.exit(2)
    from layrot.cli.main import main

    main(argv)
