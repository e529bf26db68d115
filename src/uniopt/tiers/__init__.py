"""The host profile and the hardware tiers chosen from it."""

from .backends import BackendInfo, GpuInfo
from .cpu import CpuInfo
from .profile import HostProfile, MemoryInfo, host_profile, read_host_profile
from .tiers import TIERS, Tier, TierChoice, select_tier, tier_by_name

__all__ = [
    "TIERS",
    "BackendInfo",
    "CpuInfo",
    "GpuInfo",
    "HostProfile",
    "MemoryInfo",
    "Tier",
    "TierChoice",
    "host_profile",
    "read_host_profile",
    "select_tier",
    "tier_by_name",
]
