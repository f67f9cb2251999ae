"""Storage and platform seams: settings, the clock, Table Storage, Key Vault and Entra
credentials, telemetry, the worker runtime's quirks, background tasks, caches and memory.

Knows nothing of events or calls. May import: shared.errors.
"""
