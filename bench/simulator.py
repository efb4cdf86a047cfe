"""The provider simulator as the benchmark runs it: ``runs.simulator`` unchanged, plus one workaround.

Workaround (report it upstream; drop this once ``runs/simulator/server.py`` awaits its watcher): after a
streamed response, ``ProviderSimulator._stream`` cancels its EOF watcher without awaiting it, so the next
``read_request`` on the kept-alive connection finds the watcher still parked in ``StreamReader.read`` and raises
``RuntimeError: read() called while another coroutine is already waiting``. The connection dies after every
stream, with a logged traceback. Real providers keep connections alive; without the workaround every proxied
stream would pay an upstream TCP connect and the simulator would spend CPU formatting tracebacks.
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
