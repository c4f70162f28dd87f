"""The two checks behind every `AdaptiveDPOConfig` error, shared by the config and the robustness methods that
validate their own fields: the message always names the field, its value and what is allowed."""

from __future__ import annotations


def check_choice(config, name: str, allowed) -> None:
    value = getattr(config, name)
    if value not in allowed:
        raise ValueError(f"AdaptiveDPOConfig.{name}={value!r} is not valid; allowed values: {sorted(allowed)}")


def require(config, name: str, ok: bool, requirement: str) -> None:
    if not ok:
        raise ValueError(f"AdaptiveDPOConfig.{name} must be {requirement}, got {getattr(config, name)}")
