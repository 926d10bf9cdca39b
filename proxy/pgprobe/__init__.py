"""PostgreSQL pool-health prober (DESIGN §7): `ProberSet` runs one probe loop and one small
asyncpg pool per configured target; `health` grades the results (pure)."""

from proxy.pgprobe.health import Grade, HealthTracker, Status, Thresholds, grade
from proxy.pgprobe.prober import PROBE_APPLICATION_NAME, Prober, ProberSet

__all__ = [
    "ProberSet",
    "Prober",
    "PROBE_APPLICATION_NAME",
    "HealthTracker",
    "Thresholds",
    "Grade",
    "Status",
    "grade",
]
