"""`python -m inference_service serve --config FILE`: the inference service on its own.

For a GPU host serving one or more DICOM nodes (point their [inference]
address at it) or the 3D Slicer module.
"""

from __future__ import annotations

import argparse
import sys

from inference_service.config import load_settings
from inference_service.errors import InferenceError
from inference_service.server import main as serve
from radbridge_common import logs
from radbridge_common.settings import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference_service", description=__doc__)
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--config", help="TOML config ([inference_service] and [models.*] sections)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"inference_service: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure("INFO", json_lines=True)
    try:
        serve(settings)
    except ConfigError as exc:  # e.g. a TLS file unreadable or not matching its key (at start-up)
        print(f"inference_service: configuration error: {exc}", file=sys.stderr)
        return 2
    except InferenceError as exc:
        print(f"inference_service: cannot start: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
