"""The agent as if the `[otel]` extra were not installed (its imports fail), with the usual
command line: what tracing costs with the stdlib only.

    python benchmarks/without_otel.py run --config agent.toml
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.modules["opentelemetry"] = None  # type: ignore[assignment]  # `import opentelemetry...` raises ImportError

if __name__ == "__main__":
    from agent2389_lib.cli import main
    main()
