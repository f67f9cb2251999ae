"""The deployments behind the proxy: choosing one (weighted round-robin, priorities,
cooldowns), which member holds a stored response, and the pooled HTTP client to them.

May import: shared.errors, shared.platform, shared.directory, shared.access, shared.governance.
"""

from shared.upstreams.affinity import AffinitySeal
from shared.upstreams.balancer import Balancer
from shared.upstreams.client import UpstreamClient

__all__ = ["AffinitySeal", "Balancer", "UpstreamClient"]
