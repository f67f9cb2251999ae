"""Pages (API.md section 4), anonymous routes (public event info, health) and self-registration.

May import: everything in shared/ but shared.management.
"""
