"""The provider simulator as the drill runs it: ``runs.simulator`` with the drill's scenarios and a request log
large enough for the whole drill (the built-in log keeps the last 200 requests), so the drill can compare every
provider call it served with the usage rows CesaFlow recorded. Keys are masked in the log; it lives in memory.

Usage: ``python deploy/drill_simulator.py --port N --script FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runs.simulator import ProviderSimulator, load_script

# 200 chat runs and 20 agent runs of a few turns each, with room to spare.
LOG_SIZE = 20_000


def main() -> None:
    parser = argparse.ArgumentParser(description="The provider simulator for the deployment drill (loopback only).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--script", type=Path, required=True)
    args = parser.parse_args()
    simulator = ProviderSimulator(
        port=args.port, scenarios=load_script(args.script.read_text(encoding="utf-8")), record_requests=True
    )
    simulator.state._log = deque(maxlen=LOG_SIZE)  # the only knob the state lacks: its log's size
    print(f"drill provider simulator on {simulator.base_url}", flush=True)
    asyncio.run(simulator.serve_forever())


if __name__ == "__main__":
    main()
