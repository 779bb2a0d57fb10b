"""Run one registration in a child process so a test can SIGKILL it part way (see test_crash_safety)."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.zoo.zoo_helpers import open_zoo


def main(argv: list[str]) -> int:
    root, folder, name = Path(argv[0]), Path(argv[1]), argv[2]
    zoo = open_zoo(root)
    # Imports and the catalog are ready: from here on a kill lands inside the registration itself.
    print("start", flush=True)
    zoo.register("acme", name, folder)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
