"""What is allowed and what is counted: daily caps, per-minute limits, the fair share of a
deployment near its quota, usage records and their rollups, token estimates.

May import: shared.errors, shared.platform, shared.directory, shared.access.
"""
