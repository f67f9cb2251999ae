"""Pages (docs/api.md#attendee-routes-and-pages), anonymous routes (public event info, health) and self-registration.

May import: everything in shared/ but shared.management.
"""
