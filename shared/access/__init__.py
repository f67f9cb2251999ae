"""Who is calling: the guard that slows clients sending wrong keys or codes, the signed-in
principal of management and registration calls, Entra ID access tokens (entra), and who manages:
the operator or an organiser (callers).

May import: shared.errors, shared.platform, shared.directory.
"""

from shared.access.callers import Callers
from shared.access.codes import CodeGuard
from shared.access.entra import EntraVerifier
from shared.access.gate import Access, Gate
from shared.access.guard import FailedKeyGuard

__all__ = ["Access", "Callers", "CodeGuard", "EntraVerifier", "FailedKeyGuard", "Gate"]
