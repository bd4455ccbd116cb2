"""The budgets of channel portraits and the option words, without torch (the CLI checks them before torch loads).

A budget sets the portrait's size and number of steps when they are not given:

- ``full``: 128 px, 256 steps (Lucid's defaults); a layer's 64 channels take seconds on a GPU;
- ``cpu``: 64 px, 64 steps; 16 channels of a VGG16 conv5 layer take about 2 to 4 minutes on 2 CPU cores;
- ``auto``: ``cpu`` on the CPU, ``full`` on any other device.
"""

from __future__ import annotations

from featuremaps.portrait.errors import PortraitError

#: budget -> (size in pixels, optimization steps)
BUDGETS: dict[str, tuple[int, int]] = {"cpu": (64, 64), "full": (128, 256)}
BUDGET_NAMES: tuple[str, ...] = ("auto", *BUDGETS)
OBJECTIVES: tuple[str, ...] = ("channel", "neuron")
#: Images per optimization batch when not given: memory grows with it; on a GPU a batch costs about one image.
DEFAULT_BATCH = 64


def check_budget(budget: str) -> str:
    """``budget`` when it is one of :data:`BUDGET_NAMES`, else a :class:`PortraitError` naming them."""
    if budget not in BUDGET_NAMES:
        raise PortraitError(
            f"unknown budget {str(budget)[:20]!r}; use auto, cpu (64 px, 64 steps) or full (128 px, 256 steps)"
        )
    return budget


def check_objective(objective: str) -> str:
    """``objective`` when it is one of :data:`OBJECTIVES`, else a :class:`PortraitError`."""
    if objective not in OBJECTIVES:
        raise PortraitError(
            f"objective must be 'channel' (the mean of the channel's map) or 'neuron' (its centre), got {objective!r}"
        )
    return objective


def resolve_budget(budget: str, device_type: str) -> str:
    """The budget that ``auto`` means on a device of type ``device_type`` (``cpu``, ``cuda``...)."""
    check_budget(budget)
    if budget == "auto":
        return "cpu" if device_type == "cpu" else "full"
    return budget


def budget_settings(budget: str, device_type: str, size: int | None, steps: int | None) -> tuple[str, int, int]:
    """``(budget, size, steps)``: the budget resolved for the device, and size and steps (given ones win)."""
    name = resolve_budget(budget, device_type)
    default_size, default_steps = BUDGETS[name]
    return name, default_size if size is None else size, default_steps if steps is None else steps
