from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError

MAX_PASSWORD_LENGTH = 1024


class MaximumLengthValidator:
    """Long passphrases are welcome (bcrypt-SHA256 has no 72-byte limit); megabyte 'passwords' are not."""

    def validate(self, password: str, user: Any = None) -> None:
        if len(password) > MAX_PASSWORD_LENGTH:
            raise ValidationError(f"Use at most {MAX_PASSWORD_LENGTH} characters.", code="password_too_long")

    def get_help_text(self) -> str:
        return f"Your password can be up to {MAX_PASSWORD_LENGTH} characters long."
