"""Pictures of captured feature maps: channel grids, overviews, overlays, comparisons and filters.

Everything is drawn with numpy and Pillow; matplotlib is only asked for its colormap tables (no
figure is ever made), so rendering thousands of channels costs about as much as the forward pass.
Every function returns an RGB :class:`PIL.Image.Image`.

How values become colours (the same rule in every figure):

* A range ``(vmin, vmax)`` is cut into :data:`LEVELS` equal bins, bin ``i`` gets the colormap's
  colour at ``(i + 0.5) / LEVELS`` (``cmap(x, bytes=True)``); values outside the range are clipped
  to the end colours. For a diverging range ``(-m, m)`` the value 0 gets exactly ``cmap(0.5)``.
* ``norm`` says where the range comes from: ``"map"`` (each channel / map its own min..max, the
  default), ``"layer"`` (one range for all channels of the layer), ``"global"`` (one range across
  all layers of the figure, which makes the darkening by a ReLU visible), or a fixed range given as
  ``(vmin, vmax)`` or ``"fixed:VMIN,VMAX"``.
* ``diverging=True`` (automatic when ``cmap`` is a diverging colormap such as ``RdBu_r``) makes the
  range symmetric, ``±max|x|``, so that 0 sits on the colormap's centre colour.
* A constant map (``vmin == vmax``) is drawn in the colormap's low end (no division by zero); with
  a diverging range an all-zero map is drawn in the centre colour. NaN pixels are drawn in
  :data:`NAN_COLOR`, ``+inf``/``-inf`` in the high/low end; ranges are taken over finite values.

Every figure states its scale: a colorbar with the range, or a header line (per-map scales).

The package, by figure: :mod:`~featuremaps.render.colors` (colormaps, ranges, quantization),
:mod:`~featuremaps.render.canvas` (the palette canvas, text, colorbars, resampling),
:mod:`~featuremaps.render.grid` (channel grids and the one channel-selection rule),
:mod:`~featuremaps.render.reduced` (the 2-D map drawn for a layer), :mod:`~featuremaps.render.overview`,
:mod:`~featuremaps.render.overlay` (overlay, side by side), :mod:`~featuremaps.render.comparison`,
:mod:`~featuremaps.render.filters` and :mod:`~featuremaps.render.png` (the one PNG encoder).
"""

from __future__ import annotations

from ..errors import RenderError
from ..options import NORMS, parse_norm
from .canvas import block_mean, colorbar
from .colors import (
    BACKGROUND_COLOR,
    LEVELS,
    MAX_SIDE,
    MIN_TILE,
    MIN_WIDTH,
    NAN_COLOR,
    PAD,
    SEPARATOR_COLOR,
    TEXT_COLOR,
    colorize,
    finish_range,
    is_diverging,
    value_range,
)
from .comparison import compare_runs, depth_match
from .filters import filters
from .grid import GridGeometry, channel_grid, grid_geometry, grid_layout, layer_filename, render_layer_grids
from .overlay import overlay, side_by_side
from .overview import overview
from .png import save_png, to_png_bytes

__all__ = [
    "BACKGROUND_COLOR",
    "LEVELS",
    "MAX_SIDE",
    "MIN_TILE",
    "MIN_WIDTH",
    "NAN_COLOR",
    "NORMS",
    "PAD",
    "SEPARATOR_COLOR",
    "TEXT_COLOR",
    "GridGeometry",
    "RenderError",
    "block_mean",
    "channel_grid",
    "colorbar",
    "colorize",
    "compare_runs",
    "depth_match",
    "filters",
    "finish_range",
    "grid_geometry",
    "grid_layout",
    "is_diverging",
    "layer_filename",
    "overlay",
    "overview",
    "parse_norm",
    "render_layer_grids",
    "save_png",
    "side_by_side",
    "to_png_bytes",
    "value_range",
]  # fmt: skip
