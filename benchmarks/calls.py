"""A baseline that does one piece of work per line it reads ("N" does it N times, then prints
"done"): the process is started once, so a count of its instructions covers the calls only.

    python benchmarks/calls.py requests URL     # a POST through one requests Session, its JSON read
    python benchmarks/calls.py exec COMMAND...  # subprocess.run, output captured (a command tool's own floor)
"""

import subprocess
import sys

import requests


def main() -> None:
    mode, target = sys.argv[1], sys.argv[2:]
    if mode == "requests":
        session = requests.Session()
        body = {"model": "bench", "messages": [{"role": "user", "content": "bench"}]}

        def work() -> None:
            session.post(target[0], json=body, timeout=30).json()
    elif mode == "exec":
        def work() -> None:
            subprocess.run(target, capture_output=True, timeout=30, check=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}: requests or exec")
    print("ready", flush=True)
    for line in sys.stdin:
        for _ in range(int(line)):
            work()
        print("done", flush=True)


if __name__ == "__main__":
    main()
