"""The organisers' API (docs/api.md#management), the OpenAPI document of every route, and what the
timers do (rollups, retention).

May import everything else in shared/; nothing in shared/ imports it.
"""
