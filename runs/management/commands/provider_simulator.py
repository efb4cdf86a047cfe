from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from runs.simulator import ProviderSimulator, ScenarioError, load_script


class Command(BaseCommand):
    help = (
        "Serve the provider simulator (OpenAI, Groq and Anthropic dialects) on 127.0.0.1 for offline use and tests. "
        "Pick a behaviour with the model name fake/<scenario>."
    )
    # A standalone server: it touches no database, so it must start (and print its URLs) even where none is up.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=8765, help="Port on 127.0.0.1 (0 = any free port).")
        parser.add_argument("--script", type=Path, help='JSON file {"scenarios": [...]} of named scenarios.')
        parser.add_argument(
            "--record-requests",
            action="store_true",
            help="Keep the last 200 requests in memory (keys masked) for GET /_fake/requests. Test use only.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        scenarios = []
        if options["script"] is not None:
            try:
                scenarios = load_script(options["script"].read_text(encoding="utf-8"))
            except OSError as exc:
                raise CommandError(f"Cannot read {options['script']}: {exc.strerror}") from None
            except ScenarioError as exc:
                raise CommandError(str(exc)) from None
        if not 0 <= options["port"] <= 65535:
            raise CommandError("--port must be between 0 and 65535.")
        simulator = ProviderSimulator(
            port=options["port"], scenarios=scenarios, record_requests=options["record_requests"]
        )
        try:
            asyncio.run(self._serve(simulator, [s.name for s in scenarios]))
        except KeyboardInterrupt:
            self.stdout.write("Provider simulator stopped.")

    async def _serve(self, simulator: ProviderSimulator, scripted: list[str]) -> None:
        try:
            await simulator.start()
        except OSError as exc:
            raise CommandError(f"Cannot listen on 127.0.0.1:{simulator.port}: {exc.strerror}") from None
        self.stdout.write(f"Provider simulator listening on {simulator.base_url}")
        for flavour, url in simulator.base_urls.items():
            self.stdout.write(f"  {flavour:<10} base URL: {url}")
        self.stdout.write(f"  control:   {simulator.base_url}/_fake/health")
        if scripted:
            self.stdout.write(f"  scripted scenarios: {', '.join('fake/' + n for n in scripted)}")
        self.stdout.write("Any non-empty key works (fake-invalid gets 401). Model fake/<scenario> picks a behaviour.")
        self.stdout.flush()
        await simulator.serve_forever()
