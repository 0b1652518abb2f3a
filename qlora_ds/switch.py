"""A process-wide on/off setting: its default comes from an environment variable, code changes it (``set``)."""
from __future__ import annotations

import os

_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class Switch:
    def __init__(self, env: str, default: bool):
        value = os.environ.get(env, "").strip().lower()
        self.env = env
        self.on = value not in _OFF if default else value in _ON

    def set(self, on: bool) -> bool:
        """Turn it on or off for this process; returns the previous setting."""
        previous, self.on = self.on, bool(on)
        return previous
