"""Checkpoint files: a state_dict from ``.pth``/``.pt`` (plain tensors only, ``weights_only=True``;
a pickle that could run code is refused) or ``.safetensors``, and loading one into a module with
a message that says what does not fit."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelError

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from a ``.pth``/``.pt`` file (plain tensors only: ``weights_only=True``) or a
    ``.safetensors`` file. ``{"state_dict": ...}``/``{"model": ...}`` wrappers and a
    ``module.`` prefix (DataParallel) are unwrapped."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"checkpoint {str(p)!r} not found; give the path of a .pth or .safetensors file")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            state: Any = load_file(str(p), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(
                f"cannot read {p.name} as safetensors ({first_line(exc)}); is the file complete?"
            ) from None
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ModelError(
                f"refusing to load {p.name}: it holds Python objects that could run code when unpickled "
                f"({first_line(exc)[:120]}); save a plain state_dict with torch.save(model.state_dict(), path) "
                "or use .safetensors"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise ModelError(
                f"cannot read checkpoint {p.name} ({first_line(exc)[:160]}); is it a torch.save file?"
            ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(
            f"{p.name} is not a state_dict (a dict of tensors); save one with torch.save(model.state_dict(), path)"
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_checkpoint(module: nn.Module, path: str | os.PathLike, label: str) -> None:
    state = read_state_dict(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        own = module.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(
                f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})"
            )
        detail = "; ".join(parts) or first_line(exc)[:160]
        raise ModelError(
            f"{Path(path).name} does not fit {label}: {detail}; check that it was saved from this architecture"
        ) from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
