"""The organisers' API (docs/api.md#management: `manage`, its HTTP side `http`), the table of
every HTTP route of the app (`routes`, its shape `routing`), the OpenAPI document generated from
it, and what the timers do (rollups, retention).

May import everything else in shared/; nothing in shared/ imports it.
"""
