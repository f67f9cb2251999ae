"""What organisers define and attendees hold: events and their windows, resources and each
event's catalog, attendees, keys, and the field checks of their bodies.

May import: shared.errors, shared.platform.
"""

from shared.directory.attendees import Attendee, AttendeeStore
from shared.directory.cached import CachedDirectory
from shared.directory.catalog import CatalogStore, Resource
from shared.directory.events import Event, EventStore

__all__ = [
    "Attendee",
    "AttendeeStore",
    "CachedDirectory",
    "CatalogStore",
    "Event",
    "EventStore",
    "Resource",
]
