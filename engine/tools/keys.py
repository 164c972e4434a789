"""Writes a Duet cluster's CURVE key directory (see :mod:`transfer.curve` for the model).

    python -m engine.tools.keys /etc/duet/keys            # refuses to overwrite existing keys
    python -m engine.tools.keys /etc/duet/keys --force    # new keys: every process must restart with them

Copy the directory to every host of the cluster, readable only by the user Duet runs as.
"""
from __future__ import annotations

import argparse
import stat
import sys

from duet.transfer.curve import make_keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.tools.keys", description=__doc__.splitlines()[0])
    parser.add_argument("keys_dir", metavar="DIR", help="key directory (created if missing)")
    parser.add_argument("--force", action="store_true", help="replace existing keys")
    args = parser.parse_args(argv)
    try:
        written = make_keys(args.keys_dir, force=args.force)
    except FileExistsError as exc:
        print(f"error: {exc}; pass --force to replace them", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path} (mode {stat.S_IMODE(path.stat().st_mode):o})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
