"""The options users type, read and checked in one place, without importing torch.

The CLI checks every option here before it loads a model (so a typo fails in a fraction of a
second), the viewer's form parser checks the same values, and the library calls the same
functions. Reductions (``mean``, ``topk:8``...) are read by :func:`featuremaps.reduce.parse_reduction`,
which is torch-free too.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import LayerError, OptionError, RenderError

#: ``network`` (the real forward pass) and the seed's three chains.
CHAIN_MODES: tuple[str, ...] = ("conv", "conv-relu", "conv-pool")
MODES: tuple[str, ...] = ("network", *CHAIN_MODES)
#: The named normalizations (a fixed range is the fourth kind).
NORMS: tuple[str, ...] = ("map", "layer", "global")
#: Which raw maps a ``show`` folder keeps (see :func:`featuremaps.show.save_show`).
SAVE_MAPS: tuple[str, ...] = ("none", "shown", "all")


def check_mode(mode: str) -> str:
    """``mode`` when it is one of :data:`MODES`, else a :class:`LayerError` naming them (a mode
    says which layers a capture takes)."""
    if mode not in MODES:
        raise LayerError(f"unknown mode {str(mode)[:40]!r}; use one of {', '.join(MODES)}")
    return mode


def check_save_maps(value: str) -> str:
    text = str(value).strip().lower()
    if text not in SAVE_MAPS:
        raise OptionError(f"unknown --save-maps {str(value)[:20]!r}; use one of {', '.join(SAVE_MAPS)}")
    return text


def parse_norm(norm: Any) -> str | tuple[float, float]:
    """``"map"``, ``"layer"``, ``"global"``, or a fixed ``(vmin, vmax)`` (also written ``"fixed:-1,1"``)."""
    if isinstance(norm, str):
        text = norm.strip().lower()
        if text in NORMS:
            return text
        if text.startswith("fixed"):
            body = text[5:].lstrip(":= ")
            parts = [p for p in re.split(r"[,\s]+", body) if p]
            try:
                lo, hi = (float(p) for p in parts)
            except ValueError:
                raise RenderError(
                    f"cannot read {norm!r}: write a fixed range as 'fixed:VMIN,VMAX', e.g. 'fixed:-1,1'"
                ) from None
            return _check_fixed(lo, hi, norm)
        raise RenderError(
            f"unknown norm {norm!r}; use 'map', 'layer', 'global', a (vmin, vmax) tuple or 'fixed:VMIN,VMAX'"
        )
    if isinstance(norm, (tuple, list)) and len(norm) == 2:
        try:
            lo, hi = float(norm[0]), float(norm[1])
        except (TypeError, ValueError):
            raise RenderError(f"a fixed norm is two numbers (vmin, vmax), not {norm!r}") from None
        return _check_fixed(lo, hi, norm)
    raise RenderError(f"unknown norm {norm!r}; use 'map', 'layer', 'global', a (vmin, vmax) tuple or 'fixed:VMIN,VMAX'")


def _check_fixed(lo: float, hi: float, spec: Any) -> tuple[float, float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise RenderError(f"fixed norm {spec!r} needs finite vmin < vmax, e.g. (0, 1) or 'fixed:-1,1'")
    return (lo, hi)


def norm_text(norm: Any) -> str:
    """A norm as users write it: ``map``, ``layer``, ``global`` or ``fixed:VMIN,VMAX``."""
    spec = parse_norm(norm)
    return spec if isinstance(spec, str) else f"fixed:{spec[0]:g},{spec[1]:g}"


def parse_channels(spec: str | None) -> dict[str, Any]:
    """``all`` -> every channel (in pages); ``top16``/``topk:16`` -> the 16 strongest;
    ``0-63`` -> a range; ``3,7,9`` -> those channels. Returns the options of
    :func:`featuremaps.render.channel_grid` (``{}``, ``{"top_k": k}`` or ``{"channels": [...]}``)."""
    text = (spec or "all").strip().lower()
    try:
        if text == "all":
            return {}
        if text.startswith("top"):
            k = int(text.replace("topk", "").replace("top", "").lstrip(":"))
            if k < 1:
                raise ValueError
            return {"top_k": k}
        chans: list[int] = []
        for part in text.split(","):
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                if b < a:
                    raise ValueError
                chans.extend(range(a, b + 1))
            else:
                chans.append(int(part))
        if not chans or min(chans) < 0:
            raise ValueError
        return {"channels": chans}
    except ValueError:
        raise OptionError(f"cannot read channels {spec!r}; use all, top16, 0-63 or 3,7,9") from None


def check_cmap(cmap: Any) -> Any:
    """``cmap`` when it is a matplotlib colormap (name or object), else a :class:`RenderError`."""
    import matplotlib
    from matplotlib.colors import Colormap

    if isinstance(cmap, str):
        try:
            return matplotlib.colormaps[cmap]
        except KeyError:
            raise RenderError(
                f"unknown colormap {cmap!r}; use a matplotlib colormap name such as viridis, magma, gray, jet or RdBu_r"
            ) from None
    if isinstance(cmap, Colormap):
        return cmap
    raise RenderError(f"a colormap is a matplotlib name such as 'viridis', not {type(cmap).__name__}")


def check_display(*, reduce: str = "mean", norm: Any = "map", cmap: Any = None) -> None:
    """Refuse an unknown channel reduction, norm or colormap of the pictures (the CLI's ``--reduce``,
    ``--norm``, ``--cmap``), before any work."""
    from .reduce import REDUCTIONS

    if reduce not in REDUCTIONS:
        raise OptionError(f"unknown --reduce {str(reduce)[:30]!r}; use one of {', '.join(REDUCTIONS)}")
    parse_norm(norm)
    if cmap is not None:
        check_cmap(cmap)
