"""Checkpoint files: a state_dict from ``.pth``/``.pt`` (plain tensors only, ``weights_only=True``;
a pickle that could run code is refused) or ``.safetensors``, and loading one into a module with
a message that says what does not fit."""

from __future__ import annotations

import os
import pickle
import re
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
            # memory-mapped: the tensors are read from the page cache as they are used, and a model
            # built without initialising its weights takes them as they are (see load_checkpoint)
            state = torch.load(str(p), map_location="cpu", weights_only=True, mmap=_is_zip(p))
        except pickle.UnpicklingError as exc:
            raise ModelError(_refusal(p, exc)) from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise ModelError(f"cannot read checkpoint {p.name} ({first_line(exc)}); is it a torch.save file?") from None
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


def _is_zip(p: Path) -> bool:
    """True for torch.save's zip format (the only one torch.load can memory-map)."""
    import zipfile

    return zipfile.is_zipfile(p)


def _refusal(p: Path, exc: BaseException) -> str:
    """Why a checkpoint that holds Python objects is refused, in our words (torch's own message is
    pages long, with terminal colour codes)."""
    unsafe: list[str] = []
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is not None:  # torch >= 2.5: reads the pickle's opcodes, runs nothing
        try:
            unsafe = list(finder(str(p)))
        except Exception:
            unsafe = []
    modules = [g for g in unsafe if g.startswith("torch.nn.modules.")]
    if modules:
        own = [g for g in unsafe if not g.startswith(("torch.", "collections.", "builtins."))]
        what = (own or modules)[0].rsplit(".", 1)[-1]
        return (
            f"{p.name} is a whole pickled model (a {what} object), not a state_dict, and featuremaps does not unpickle "
            "objects (that can run code); load it yourself where you trust it and save its weights with "
            "torch.save(model.state_dict(), 'weights.pth'), then pass that file"
        )
    shown = f" such as {unsafe[0]}" if unsafe else ""
    return (
        f"refusing to load {p.name}: it holds Python objects{shown} that could run code when unpickled; save a plain "
        "state_dict with torch.save(model.state_dict(), path) or use .safetensors"
    )


def load_checkpoint(module: nn.Module, path: str | os.PathLike, label: str, *, assign: bool = False) -> None:
    """Load the checkpoint at ``path`` into ``module`` (strict: every key, every shape). With
    ``assign`` the module's tensors are replaced by the checkpoint's own (cast to the module's
    dtypes), so a module built on the meta device, without initialising its weights, is ready."""
    state = read_state_dict(path)
    if assign:
        own = module.state_dict(keep_vars=True)
        state = {k: v.to(own[k].dtype) if k in own and v.dtype != own[k].dtype else v for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True, assign=assign)
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
        detail = "; ".join(parts) or first_line(exc)
        raise ModelError(
            f"{Path(path).name} does not fit {label}: {detail}; check that it was saved from this architecture"
        ) from None


_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's first line, without terminal escape codes, shortened at a word boundary."""
    lines = _ESCAPES.sub("", str(exc)).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else type(exc).__name__
    if len(text) > limit:
        text = text[: limit - 1].rsplit(" ", 1)[0].rstrip(",;:") + "…"
    return text
