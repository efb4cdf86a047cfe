"""Re-seal every provider key (and every other registered sealed value: operators' TOTP secrets, projects'
webhook secrets, ``keys.sealed``) that is not under the keyring's primary kid (key rotation, README). Provider keys
still sealed with an older associated data version (before the destination joined it) are re-sealed too: every
key this command writes is under the primary kid and the current AAD.

One row per transaction with the row locked, so the app keeps serving while it runs and an interrupted run
loses nothing: run it again and it continues with the rows still on an old kid or AAD (idempotent, resumable). Rows
that cannot be opened are left as they are, counted, and audited as ``key.decrypt_failed``; the command then
exits non-zero. A summary ``key.rewrapped`` event goes to each affected org's audit trail, plus one
installation-wide event (org=None) with the totals.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys import selectors, services
from keys.crypto import Keyring
from keys.sealed import SEALED_FIELDS, sealed_fields_rewrap


class Command(BaseCommand):
    help = (
        "Re-seal provider keys under the primary keyring kid and the current associated data, one row per "
        "transaction (safe to re-run)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="Only count the keys that need re-sealing.")
        parser.add_argument(
            "--limit", type=int, default=0, help="Stop after this many keys (0 = all); run again to continue."
        )

    def handle(self, *args: Any, dry_run: bool = False, limit: int = 0, **options: Any) -> None:
        keyring: Keyring = settings.KEYRING
        ids = selectors.unscoped_provider_key_ids_to_rewrap(primary_kid=keyring.primary_kid)
        if limit > 0:
            ids = ids[:limit]
        total = len(ids)
        self.stdout.write(f"Primary kid {keyring.primary_kid}: {total} provider key(s) to re-seal.")
        if dry_run:
            return
        self._rewrap_other_sealed_values(keyring)
        if total == 0:
            return

        summary = services.RewrapSummary(to_kid=keyring.primary_kid)
        step = max(1, total // 20)  # about twenty progress lines, whatever the size
        for done, key_id in enumerate(ids, start=1):
            try:
                services.provider_key_rewrap(key_id=key_id, summary=summary)
            except services.ProviderKeyDecryptionError:
                self.stderr.write(f"  key {key_id}: cannot be decrypted with this keyring; left unchanged")
            if done % step == 0 or done == total:
                self.stdout.write(f"{self._bar(done, total)} {done}/{total}")
        services.provider_keys_rewrap_record(summary=summary)
        self.stdout.write(
            f"Done: {summary.rewrapped} re-sealed under kid {summary.to_kid}, {summary.skipped} already done, "
            f"{summary.failed} failed."
        )
        if summary.failed:
            raise CommandError(
                f"{summary.failed} provider key(s) could not be decrypted; keep their kid in CESAFLOW_KEYRING, or "
                "revoke and add again a key whose row was changed (see the audit trail: key.decrypt_failed)."
            )

    def _rewrap_other_sealed_values(self, keyring: Keyring) -> None:
        """Operators' TOTP secrets, projects' webhook secrets: whatever apps registered (keys.sealed)."""
        rewrapped, failed = sealed_fields_rewrap(keyring)
        labels = ", ".join(sorted({spec.label for spec in SEALED_FIELDS})) or "none registered"
        self.stdout.write(f"Other sealed values ({labels}): {rewrapped} re-sealed, {failed} failed.")
        if failed:
            raise CommandError(f"{failed} other sealed value(s) could not be decrypted; keep their kid (see the log).")

    @staticmethod
    def _bar(done: int, total: int, width: int = 30) -> str:
        filled = round(width * done / total)
        return "[" + "#" * filled + "." * (width - filled) + "]"
