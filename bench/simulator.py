"""The provider simulator as the benchmark runs it: ``runs.simulator`` with the benchmark's scenario script.

Usage: ``python -m bench.simulator --port N --script FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from runs.simulator import ProviderSimulator, load_script


def main() -> None:
    parser = argparse.ArgumentParser(description="The provider simulator for the benchmark (loopback only).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--script", type=Path, required=True)
    args = parser.parse_args()
    simulator = ProviderSimulator(port=args.port, scenarios=load_script(args.script.read_text(encoding="utf-8")))
    print(f"bench provider simulator on {simulator.base_url}", flush=True)
    asyncio.run(simulator.serve_forever())


if __name__ == "__main__":
    main()
