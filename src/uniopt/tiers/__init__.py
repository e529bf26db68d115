"""The host profile and the hardware tiers chosen from it."""

from .backends import BackendInfo, GpuInfo
from .bandwidth import BandwidthProbe, floor_seconds, memory_bandwidth
from .cpu import CpuInfo
from .profile import HostProfile, MemoryInfo, host_profile, read_host_profile
from .tiers import TIERS, Tier, TierChoice, select_tier, tier_by_name

__all__ = [
    "TIERS",
    "BackendInfo",
    "BandwidthProbe",
    "CpuInfo",
    "GpuInfo",
    "HostProfile",
    "MemoryInfo",
    "Tier",
    "TierChoice",
    "floor_seconds",
    "host_profile",
    "memory_bandwidth",
    "read_host_profile",
    "select_tier",
    "tier_by_name",
]
