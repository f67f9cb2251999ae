"""Who is calling: the guard that slows clients sending wrong keys or codes, and the signed-in
principal of management and registration calls.

May import: shared.errors, shared.platform, shared.directory.
"""
