"""Who is calling: the guard that slows clients sending wrong keys or codes, the signed-in
principal of management and registration calls, Entra ID access tokens (entra), and who manages:
the operator or an organiser (callers).

May import: shared.errors, shared.platform, shared.directory.
"""
