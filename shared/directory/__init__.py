"""What organisers define and attendees hold: events and their windows, resources and each
event's catalog, attendees, keys, and the field checks of their bodies.

May import: shared.errors, shared.platform.
"""
