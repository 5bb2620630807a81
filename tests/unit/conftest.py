"""Unit tests: no broker, no database, no worker process (the root conftest keeps them hermetic)."""
