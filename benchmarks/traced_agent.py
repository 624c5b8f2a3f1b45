"""The agent with tracemalloc on, for finding what grows (soak.py --tracemalloc DIR): a snapshot
every SNAPSHOT_EVERY seconds (default 60) into SNAPSHOT_DIR, then the usual command line.

    SNAPSHOT_DIR=/tmp/snaps python benchmarks/traced_agent.py run --config agent.toml
"""

import os
import sys
import threading
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def snapshots(directory: str, every: float) -> None:
    for index in range(1, 10 ** 6):
        time.sleep(every)
        tracemalloc.take_snapshot().dump(os.path.join(directory, f"{index:04d}.snapshot"))


if __name__ == "__main__":
    tracemalloc.start(8)
    threading.Thread(target=snapshots, args=(os.environ["SNAPSHOT_DIR"], float(os.environ.get("SNAPSHOT_EVERY", 60))),
                     daemon=True).start()
    from agent2389_lib.cli import main
    main()
