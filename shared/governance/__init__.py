"""What is allowed and what is counted: daily caps, per-minute limits, the fair share of a
deployment near its quota, prices and budgets, usage records and their rollups, the journal of
calls in flight, token estimates.

May import: shared.errors, shared.platform, shared.directory, shared.access.
"""

from shared.governance.alerts import Alerts, AlertView
from shared.governance.budgets import Budgets
from shared.governance.caps import Caps
from shared.governance.fairshare import FairShare
from shared.governance.journal import CallJournal
from shared.governance.ratelimits import RateLimits
from shared.governance.rollups import GROUPS, UsageReport
from shared.governance.toolcalls import ToolCalls
from shared.governance.usage import UsageWriter

__all__ = [
    "GROUPS",
    "AlertView",
    "Alerts",
    "Budgets",
    "CallJournal",
    "Caps",
    "FairShare",
    "RateLimits",
    "ToolCalls",
    "UsageReport",
    "UsageWriter",
]
