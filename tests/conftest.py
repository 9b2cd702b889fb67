"""kdkit first: its thread settings (kdkit.util.threads) must be in the environment before torch starts."""

import kdkit  # noqa: F401
