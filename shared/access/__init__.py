"""Who is calling: the guard that slows clients sending wrong keys or codes, the signed-in
principal of management and registration calls, and Entra ID access tokens (entra).

May import: shared.errors, shared.platform, shared.directory.
"""
