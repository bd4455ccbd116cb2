"""``featuremaps demo``: the seed's whole story in one report.

1. VGG16's three chains (conv, conv-relu, conv-pool) on the drawn "edge" picture, side by side on
   one colour scale, with the numbers that show ReLU's darkening and pooling's shrinking;
2. the seed's closing picture: the input next to a late feature map;
3. the real network (``network`` mode) on the edge picture and the bundled photos, with channel
   grids and an overlay;
4. VGG16 against AlexNet at matching depth;
5. the first layer's filters.

Pretrained weights are used when torchvision's cache has them or they can be downloaded; otherwise
the demo says so loudly (terminal and report title) and runs with random weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import render
from .capture import capture
from .errors import WeightsUnavailableError
from .images import edge_image, load_image
from .maps import FeatureMaps
from .models import load_model
from .report import Section, build_report
from .runs import (
    Picture,
    atomic_folder,
    encode_pictures,
    manifest_for,
    write_manifest,
    write_pictures,
)

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")


@dataclass(frozen=True)
class DemoResult:
    folder: Path
    pretrained: bool
    weights: str
    chains: dict[str, FeatureMaps] = field(repr=False)
    networks: dict[str, FeatureMaps] = field(repr=False)


def _load(name: str, weights: str, *, size: int, device: str, warn: Callable[[str], None]):
    if weights != "auto":
        return load_model(name, weights, size=size, device=device, progress=False)
    try:
        return load_model(name, "DEFAULT", size=size, device=device)
    except WeightsUnavailableError as exc:
        warn(f"WARNING: {exc}")
        warn(f"WARNING: the demo continues with RANDOM weights for {name}; its maps show an untrained network.")
        return load_model(name, "random", size=size, device=device)


def follows(m: np.ndarray, picture: Image.Image) -> float:
    """How closely a 2-D map follows a drawing: the absolute correlation between the map,
    resized (bilinear) to the picture, and the picture's ink (1 - gray level). 1: the map is the
    drawing (or its negative); 0: no trace of it."""
    ink = 1.0 - np.asarray(picture.convert("L"), dtype=np.float64) / 255.0
    up = np.asarray(Image.fromarray(m.astype(np.float32)).resize(picture.size, Image.Resampling.BILINEAR), np.float64)
    if up.std() == 0 or ink.std() == 0:
        return 0.0
    return float(abs(np.corrcoef(up.ravel(), ink.ravel())[0, 1]))


def _telling_channel(after_relu) -> int:
    """The channel where a ReLU changes most while leaving something to see: about half its values
    zeroed (4 f (1 - f) with f the zero fraction) times its spread after the ReLU. A channel that
    is all positive looks the same before and after; a dead one shows nothing."""
    flat = after_relu.flatten(1).float()
    f = (flat == 0).float().mean(dim=1)
    return int((4 * f * (1 - f) * flat.std(dim=1)).argmax())


def _chain_text(chains: dict[str, FeatureMaps], edge: Image.Image, size: int, pretrained: bool) -> str:
    """What the numbers of this run say about the three chains (not what the seed saw with its
    trained network, unless this run is one)."""
    acts = chains["conv-relu"].select(kind="act")
    convs = chains["conv"]
    pool_convs = chains["conv-pool"].select(kind="conv")
    zero = sum(s.zero_fraction for s in acts.stats()) / max(1, len(acts))
    mean_conv = sum(s.mean for s in convs.stats()) / max(1, len(convs))
    mean_relu = sum(s.mean for s in acts.stats()) / max(1, len(acts))
    sizes = " -> ".join(str(e.shape[-1]) for e in chains["conv-pool"].select(kind="pool").entries)

    def trail(maps: FeatureMaps) -> str:
        r = [follows(e.reduced("mean"), edge) for e in maps.entries]
        picks = sorted({0, len(r) // 2, len(r) - 1})
        return ", ".join(f"{r[i]:.2f} at layer {i + 1}" for i in picks)

    text = (
        f"Each chain applies VGG16's layers one after another to the previous output. Conv only keeps every map at "
        f"{size}x{size}. After each ReLU on average {zero:.0%} of the values are exactly zero; the channel mean after a "
        f"ReLU is positive everywhere (mean {mean_relu:.3g} against {mean_conv:.3g} for the conv-only chain), which is "
        f"why its row is light, while single channels turn dark (see the next section). With max-pooling the maps shrink "
        f"{size} -> {sizes}. How closely each channel-mean map still follows the drawing (the correlation of the map, "
        f"resized to the picture, with its ink): conv {trail(convs)}; conv-relu {trail(acts)}; conv-pool "
        f"{trail(pool_convs)}."
    )
    if pretrained:
        text += " The seed, with the same ImageNet weights, saw the shapes blur for a human eye after about layer 11."
    else:
        text += (
            " These are the numbers of an untrained network (random weights); the seed, with ImageNet weights, saw the "
            "shapes blur for a human eye after about layer 11 of the pooling chain."
        )
    return text


def _top5(model, maps: FeatureMaps) -> str:
    """The top-5 classes of the real network for the picture (pretrained weights only)."""
    import torch

    if not model.pretrained or not model.categories or maps.image is None:
        return ""
    x = model.preprocessing.to_tensor(maps.image).to(model.device)
    with torch.inference_mode():
        probs = model.module.eval()(x).softmax(-1)[0]
    top = torch.topk(probs, 5)
    return "Top-5 classes: " + ", ".join(
        f"{model.categories[i]} {p:.0%}" for p, i in zip(top.values.tolist(), top.indices.tolist())
    )


def run_demo(
    folder: str | os.PathLike,
    *,
    weights: str = "auto",
    size: int = 224,
    device: str = "cpu",
    overwrite: bool = False,
    photos: tuple[str, ...] = PHOTOS,
    on_step: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the demo and write its report folder (``index.html``, pictures, ``manifest.json``)."""
    step = on_step or (lambda text: None)
    warn = warn or (lambda text: None)
    vgg = _load("vgg16", weights, size=size, device=device, warn=warn)
    step(f"loaded VGG16 ({vgg.weights})")
    alex = _load("alexnet", weights, size=size, device=device, warn=warn)
    step(f"loaded AlexNet ({alex.weights})")
    pretrained = vgg.pretrained and alex.pretrained
    edge = edge_image(size)

    # 1. the three chains: the big 224x224 chains keep only their channel mean (the seed's picture)
    chains = {
        "conv": capture(vgg, edge, mode="conv", reduce="mean"),
        "conv-relu": capture(vgg, edge, mode="conv-relu", reduce="mean"),
        "conv-pool": capture(vgg, edge, mode="conv-pool"),
    }
    step("ran the three chains on the edge picture")
    pics: list[Picture] = [
        Picture(
            "edge.png",
            edge,
            kind="input",
            caption="the drawn edge test picture (lines at several angles, circles, triangles, rectangles)",
        ),
        Picture(
            "chains_compare.png",
            render.compare_runs(chains),
            kind="comparison",
            caption="VGG16's 13 conv layers in the three chains (channel mean): the conv outputs, the outputs after "
            "each ReLU, and the conv outputs between max-pools; each tile has its own range (under it), zero at "
            "the dark end for non-negative maps",
        ),
    ]
    for label, maps in chains.items():
        pics.append(
            Picture(
                f"chain_{label}.png",
                render.overview(maps, reduce="mean"),
                kind="overview",
                caption=f"{label} chain: every step (channel mean, each map its own range)",
            )
        )
    last = chains["conv"].entries[-1]
    pics.append(
        Picture(
            "edge_vs_layer13.png",
            render.side_by_side(edge, last, reduce="mean"),
            kind="comparison",
            caption=f"the input next to layer 13 ({last.name}) of the conv chain",
        )
    )
    chain_text = _chain_text(chains, edge, size, pretrained)

    # what a ReLU does to one channel: the real network's conv outputs and the same outputs after their ReLU
    relu_maps = capture(vgg, edge, layers="conv,relu")
    acts = relu_maps.select(kind="act", spatial=True)
    columns = render.depth_match(7, len(acts))
    channels = [_telling_channel(acts.entries[i].tensor[0]) for i in columns]
    before_after = {"conv output": relu_maps.select(kind="conv", spatial=True), "after its ReLU": acts}
    pics.append(
        Picture(
            "relu_before_after.png",
            render.compare_runs(before_after, channel=channels, max_columns=7),
            kind="comparison",
            caption="one channel of VGG16's conv layers before and after its ReLU (network mode, the channel under "
            "each tile): the negative values become 0, the darkest colour; each tile has its own range",
        )
    )
    relu_zero = sum(s.zero_fraction for s in acts.stats()) / max(1, len(acts))
    relu_text = (
        f"A ReLU sets every negative value to 0: in the real network {relu_zero:.0%} of the values after each ReLU "
        "are zero. Drawn on its own scale, with 0 at the dark end, a channel turns dark wherever its conv output was "
        "negative: the darkening the seed saw in single channels."
    )

    # 2-3. the real network on the edge picture and the photos
    networks: dict[str, FeatureMaps] = {}
    net_sections = []
    for name in ("edge", *photos):
        picture = edge if name == "edge" else load_image(f"sample:{name}")
        maps = capture(vgg, picture, layers="conv")
        networks[name] = maps
        deepest = maps.entries[-1]
        net_pics = [
            Picture(
                f"network_{name}_overview.png",
                render.overview(maps, reduce="mean"),
                kind="overview",
                caption=f"VGG16 network mode on {name}: the 13 conv outputs (channel mean)",
            ),
            Picture(
                f"network_{name}_overlay.png",
                render.overlay(deepest, maps.image, reduce="mean", alpha=0.55, legend=True),
                kind="overlay",
                layer=deepest.name,
                caption=f"{deepest.name} (channel mean) over the input",
            ),
        ]
        if name == "edge":
            for layer in (maps.entries[0], maps.entries[6], deepest):
                net_pics.append(
                    Picture(
                        f"network_edge_grid_{layer.name}.png",
                        render.channel_grid(layer, top_k=32, cmap="RdBu_r", diverging=True),
                        kind="grid",
                        layer=layer.name,
                        caption=f"{layer.name}: the 32 strongest channels; conv outputs keep their negative values (blue)",
                    )
                )
        net_sections.append(Section(f"The real network on {name}", text=_top5(vgg, maps), pictures=net_pics))
        step(f"captured VGG16 on {name}")

    # 4. VGG16 against AlexNet
    cmp_name = photos[0] if photos else "edge"
    cmp_picture = edge if cmp_name == "edge" else load_image(f"sample:{cmp_name}")
    alex_maps = capture(alex, cmp_picture, layers="conv")
    pair = {"VGG16": networks[cmp_name], "AlexNet": alex_maps}
    edge_pair = {"VGG16": networks["edge"], "AlexNet": capture(alex, edge, layers="conv")}
    pics_cmp = [
        Picture(
            "vgg16_vs_alexnet.png",
            render.compare_runs(pair, norm="map"),
            kind="comparison",
            caption=f"VGG16 (13 conv layers) vs AlexNet (5) on {cmp_name}, columns matched by relative depth",
        ),
        Picture(
            "vgg16_vs_alexnet_edge.png",
            render.compare_runs(edge_pair, norm="map"),
            kind="comparison",
            caption="the same on the edge picture",
        ),
    ]
    step("compared VGG16 and AlexNet")

    # 5. filters
    import torch

    first_conv = next(m for m in vgg.module.modules() if isinstance(m, torch.nn.Conv2d))
    filt = Picture(
        "filters_vgg16_conv1.png",
        render.filters(first_conv),
        kind="filters",
        caption="VGG16's 64 first-layer filters (RGB)",
    )

    weights_text = f"VGG16 {vgg.weights}, AlexNet {alex.weights}"
    warning = None
    title = "featuremaps demo: what VGG16 sees"
    if not pretrained:
        title += " — RANDOM WEIGHTS (pretrained weights unavailable)"
        warning = (
            "Pretrained weights were not available (not cached, no download possible), so this demo ran with RANDOM "
            "weights: the pictures show an untrained network. Put the weights in torchvision's cache (see the terminal "
            "message) and run `featuremaps demo` again for the real thing."
        )
    sections = [
        Section(
            "The test picture",
            text="A 224x224 sheet of geometric edges drawn for the occasion, as in the seed.",
            pictures=[pics[0]],
        ),
        Section(
            "Three ways through VGG16's conv layers",
            text=chain_text,
            pictures=[p for p in pics[1:] if p.path != "relu_before_after.png"],
            tables=[(f"{label} chain: per-layer numbers", maps.stats()) for label, maps in chains.items()],
        ),
        Section("What a ReLU does", text=relu_text, pictures=[p for p in pics if p.path == "relu_before_after.png"]),
        *net_sections,
        Section(
            "VGG16 against AlexNet",
            text="The seed found VGG16's maps sharper than AlexNet's; compare for yourself.",
            pictures=pics_cmp,
            tables=[("AlexNet on " + cmp_name, alex_maps.stats())],
        ),
        Section("Filters: the other half of what a CNN sees", pictures=[filt]),
    ]
    all_pics = encode_pictures([p for s in sections for p in s.pictures])
    by_path = {p.path: p for p in all_pics}
    sections = [Section(s.title, s.text, [by_path[p.path] for p in s.pictures], s.tables) for s in sections]
    html_text = build_report(
        title=title,
        sections=sections,
        warning=warning,
        meta={"weights": weights_text, "input size": f"{size}x{size}", "device": str(device)},
    )
    manifest = {
        "pretrained": pretrained, "weights": weights_text,
        "runs": {f"chain {k}": manifest_for(v, raw=False) for k, v in chains.items()}
        | {f"network {k}": manifest_for(v, raw=False) for k, v in networks.items()}
        | {f"alexnet {cmp_name}": manifest_for(alex_maps, raw=False)},
        "pictures": [{"path": p.path, "kind": p.kind, "caption": p.caption} for p in all_pics],
    }  # fmt: skip
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        write_pictures(tmp, all_pics)
        (tmp / "index.html").write_text(html_text, encoding="utf-8")
        write_manifest(tmp, manifest, kind="demo")
    step("wrote the report")
    return DemoResult(
        folder=Path(folder), pretrained=pretrained, weights=weights_text, chains=chains, networks=networks
    )
