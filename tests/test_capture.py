"""The network mode against an independent oracle, in-place safety, hooks and model state."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from torch import nn
from torchvision.models import get_model
from torchvision.models.feature_extraction import (
    create_feature_extractor,
    get_graph_node_names,
)

import featuremaps as fm
from featuremaps.errors import LayerError
from featuremaps.hooks import _LEARNED

ARCHS = [
    ("vgg16", 64),
    ("vgg11_bn", 64),
    ("alexnet", 64),
    ("resnet18", 64),
    ("mobilenet_v3_small", 64),
    ("efficientnet_b0", 64),
    ("densenet121", 64),
    ("convnext_tiny", 64),
    ("googlenet", 64),
]


def oracle(model: nn.Module, x: torch.Tensor, nodes: list[str]) -> dict[str, torch.Tensor]:
    """torchvision's FX feature extractor on a deep copy with every in-place op made out-of-place.

    FX, like naive hooks, returns a conv output *after* a following in-place ReLU overwrote it, so
    the copy has each ``inplace`` flag and argument off and each ``x += y`` turned into ``x + y``.
    """
    clean = copy.deepcopy(model).eval()
    for m in clean.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    fx = create_feature_extractor(clean, return_nodes={n: n for n in nodes})
    for node in fx.graph.nodes:
        if node.op == "call_function" and node.target is operator.iadd:
            node.target = operator.add
        if node.kwargs.get("inplace") is True:  # F.relu(x, inplace=True) in a forward()
            node.kwargs = {**node.kwargs, "inplace": False}
    fx.recompile()
    with torch.no_grad():
        return fx(x)


def no_hooks_left(model: nn.Module) -> bool:
    """No forward hook or pre-hook on any module of ``model``, and none left global."""
    from torch.nn.modules import module as torch_module

    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()) and not (
        torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
    )


def fx_name(name: str) -> str:
    """``layer1.0.relu#2`` (our 2nd call) -> ``layer1.0.relu_1`` (FX's name for it)."""
    base, _, k = name.partition("#")
    return f"{base}_{int(k) - 1}" if k else base


@pytest.mark.parametrize("arch,size", ARCHS)
def test_every_leaf_output_equals_the_oracle(arch, size):
    torch.manual_seed(0)
    model = get_model(
        arch, weights=None, **({"aux_logits": False, "init_weights": True} if arch == "googlenet" else {})
    ).eval()
    x = torch.randn(1, 3, size, size)
    _, eval_nodes = get_graph_node_names(model)
    modules = dict(model.named_modules())
    # FX output nodes that are module calls: leaves, and the containers torchvision's tracer keeps whole
    paths = sorted({n.rsplit("_", 1)[0] if n not in modules else n for n in eval_nodes} & (set(modules) - {""}))
    maps = fm.capture(model, x, layers=paths)
    common = [e.name for e in maps.entries if fx_name(e.name) in eval_nodes]
    compared = {n.split("#")[0] for n in common}
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    uncovered = [c for c in convs if not any(c == p or c.startswith(p + ".") for p in compared)]
    assert not uncovered, f"conv outputs not compared: {uncovered[:3]}"
    assert len(common) >= 20
    expected = oracle(model, x, [fx_name(n) for n in common])
    for name in common:
        got, want = maps[name].tensor, expected[fx_name(name)]
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{arch} {name}")
    # the model is left exactly as it was
    assert no_hooks_left(model)
    assert not model.training


def test_conv_outputs_keep_negative_values_under_inplace_relu():
    torch.manual_seed(0)
    model = get_model("vgg11", weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    maps = fm.capture(model, x, layers="conv,relu")
    conv, relu = maps["features.0"].tensor, maps["features.1"].tensor
    assert conv.min() < 0, "a conv output lost its negative values to the in-place ReLU"
    torch.testing.assert_close(relu, conv.clamp(min=0))
    with torch.no_grad():
        want = model.features[0](x)
    torch.testing.assert_close(conv, want)
    assert model.features[1].inplace is True  # flags untouched


def test_functional_inplace_add_does_not_corrupt_capture():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            out = self.bn(self.conv(x))
            out += x  # functional in-place on a captured output
            out.mul_(2)
            out[:, 0] = 0
            return torch.relu_(out)

    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(1, 2, 8, 8)
    maps = fm.capture(block, x, layers="all")
    with torch.no_grad():
        want = block.bn(block.conv(x))
    torch.testing.assert_close(maps["bn"].tensor, want)


def test_repeated_module_gets_one_entry_per_call():
    torch.manual_seed(0)
    model = get_model("resnet18", weights=None).eval()
    maps = fm.capture(model, torch.randn(1, 3, 64, 64), layers="layer1.0.relu")
    assert maps.names == ["layer1.0.relu", "layer1.0.relu#2"]
    assert [e.call for e in maps.entries] == [1, 2]


class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x):
        self.conv(x)
        raise RuntimeError("boom")


def test_hooks_removed_and_flags_restored_when_forward_raises():
    model = Boom().train()
    model.conv.eval()
    with pytest.raises(RuntimeError, match="boom"):
        fm.capture(model, torch.randn(1, 3, 8, 8), layers="conv")
    assert no_hooks_left(model)
    assert model.training is True and model.conv.training is False


def test_training_flags_and_hooks_untouched_after_success(tiny):
    tiny.train()
    tiny.features[0].eval()
    before = {n: m.training for n, m in tiny.named_modules()}
    fm.capture(tiny, torch.randn(1, 3, 16, 16), layers="all")
    assert {n: m.training for n, m in tiny.named_modules()} == before
    assert no_hooks_left(tiny)


def test_non_tensor_outputs_are_skipped_with_a_note():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x * 2

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)
            self.pair = Pair()

        def forward(self, x):
            a, b = self.pair(self.conv(x))
            return a + b

    maps = fm.capture(Net().eval(), torch.randn(1, 3, 8, 8), layers="all")
    assert maps.names == ["conv"]
    assert any("pair" in n and "tuple" in n for n in maps.notes)


@pytest.mark.parametrize("method", ["mean", "max", "l2", "std"])
def test_reduction_in_hook_matches_reduction_afterwards(tiny, method):
    x = torch.randn(1, 3, 16, 16)
    full = fm.capture(tiny, x, layers="conv")
    red = fm.capture(tiny, x, layers="conv", reduce=method)
    for name in full:
        assert red[name].tensor.shape == (1, 16 if name == "features.0" else 8, 16 if name == "features.0" else 8)
        torch.testing.assert_close(
            torch.from_numpy(red[name].reduced(method)), torch.from_numpy(full[name].reduced(method))
        )
        assert red[name].stats == full[name].stats  # numbers of the full output, kept in the hook
        assert red[name].shape == full[name].shape
    ref = full["features.0"].tensor[0]
    want = {"mean": ref.mean(0), "max": ref.amax(0), "l2": ref.pow(2).sum(0).sqrt(), "std": ref.std(0, correction=0)}[
        method
    ]
    torch.testing.assert_close(red["features.0"].tensor[0], want)


def test_topk_keeps_the_strongest_channels(tiny):
    x = torch.randn(1, 3, 16, 16)
    full = fm.capture(tiny, x, layers="features.3")
    top = fm.capture(tiny, x, layers="features.3", reduce="topk:2:max")
    scores = full["features.3"].tensor[0].amax(dim=(1, 2))
    want = torch.topk(scores, 2).indices.tolist()
    assert list(top["features.3"].channels) == want
    torch.testing.assert_close(top["features.3"].tensor, full["features.3"].tensor[:, want])


def test_early_stop_skips_the_classifier_once_the_schedule_is_known():
    torch.manual_seed(0)
    model = get_model("vgg11", weights=None).eval()
    calls = []
    handle = model.classifier.register_forward_hook(lambda *a: calls.append(1))
    try:
        x = torch.randn(1, 3, 64, 64)
        first = fm.capture(model, x, layers="conv")
        second = fm.capture(model, x, layers="conv")
        assert len(calls) == 1, "the second capture must stop after the last conv"
        for name in first:
            torch.testing.assert_close(first[name].tensor, second[name].tensor)
        fm.capture(model, x, layers="conv", stop_early=False)
        assert len(calls) == 2
    finally:
        handle.remove()
    assert model in _LEARNED and _LEARNED[model].schedules


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("conv", ["features.0", "features.3"]),
        ("relu", ["features.1", "features.4"]),
        ("pool", ["features.2", "features.5", "pool"]),
        ("linear", ["classifier"]),
        ("features.*", [f"features.{i}" for i in range(6)]),
        ("conv,linear", ["features.0", "features.3", "classifier"]),
        (["features", "name:pool"], ["features", "pool"]),
    ],
)
def test_layer_selection(tiny, spec, expected):
    assert fm.select_layers(tiny, spec) == expected


def test_unknown_layer_names_get_close_matches(tiny):
    with pytest.raises(LayerError, match=r"no layer named 'features\.33'; did you mean features\.3"):
        fm.select_layers(tiny, "features.33")
    with pytest.raises(LayerError, match="pattern 'blocks.*' matches no layer"):
        fm.select_layers(tiny, "blocks.*")
    with pytest.raises(LayerError, match="has no norm layers"):
        fm.select_layers(tiny, "norm")
    with pytest.raises(LayerError, match="unknown mode 'relu'"):
        fm.capture(tiny, torch.randn(1, 3, 8, 8), mode="relu")


def test_results_are_ordered_immutable_and_keyed(tiny):
    maps = fm.capture(tiny, torch.randn(1, 3, 16, 16), layers="all")
    assert maps.names == fm.select_layers(tiny, "all")
    assert [e.index for e in maps.entries] == list(range(len(maps)))
    assert maps[0] is maps["features.0"]
    with pytest.raises(AttributeError):
        maps["features.0"].name = "x"  # type: ignore[misc]
    with pytest.raises(LayerError, match="did you mean features.0"):
        maps["features.00"]
    assert maps["features.0"].maps().shape == (4, 16, 16)
    assert maps.select(kind="conv").names == ["features.0", "features.3"]


def test_stats_are_exact_on_a_known_tensor():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(x)

    x = torch.tensor([[[[-1.0, 2.0], [0.0, 3.0]], [[-1.0, -2.0], [-3.0, -4.0]]]])  # (1, 2, 2, 2)
    stats = fm.capture(Fixed(), x, layers="all")["act"].stats
    assert stats.shape == (1, 2, 2, 2)
    assert (stats.min, stats.max) == (0.0, 3.0)
    assert stats.mean == pytest.approx(5 / 8)
    assert stats.zero_fraction == pytest.approx(6 / 8)
    assert stats.dead_fraction == 0.5  # the second channel is all zero
    assert stats.std == pytest.approx(torch.tensor([0, 2, 0, 3, 0, 0, 0, 0.0]).std(correction=0).item())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_stats_of_large_maps_match_float64(layout):
    """Millions of values: the numbers must not drift with float32 accumulation (one float32 norm
    over these 16.8M values was 0.4% off; over VGG16's first map at 2048x2048, 9%)."""
    from featuremaps.maps import compute_stats

    torch.manual_seed(0)
    x = torch.randn(1, 64, 512, 512 + 3 * (layout == "sliced")).relu_().add_(0.3)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[..., 3:]  # a view with gaps between its rows
    d = x.double()
    got = compute_stats(x, "a", "act")
    assert got.std == pytest.approx(d.std(correction=0).item(), rel=2e-5)
    assert got.mean == pytest.approx(d.mean().item(), rel=2e-5)
    assert got.zero_fraction == 0.0 and got.min == pytest.approx(0.3)


def test_list_layers_reports_shapes_and_parameters(tiny):
    rows = fm.list_layers(tiny, size=16)
    assert [r.name for r in rows] == fm.select_layers(tiny, "all")
    first = rows[0]
    assert (first.kind, first.type, first.output_shape, first.parameters) == (
        "conv",
        "Conv2d",
        (1, 4, 16, 16),
        4 * 3 * 9 + 4,
    )
    assert rows[-1].output_shape == (1, 5)
    assert all(not m._forward_hooks for m in tiny.modules())


class ViewThenInplace(nn.Module):
    """Holds a view of a conv output across an in-place ReLU: the view must see the ReLU's result."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.conv(x)
        first = out[:, :1]
        out = self.act(out)
        out += 1  # functional in-place on a captured output too
        return out * first


@pytest.mark.parametrize("arch", ["view", "resnet18", "densenet121", "vgg11"])
def test_capture_does_not_change_what_the_model_computes(arch):
    torch.manual_seed(0)
    model = ViewThenInplace().eval() if arch == "view" else get_model(arch, weights=None).eval()
    x = torch.randn(1, 3, 32 if arch != "view" else 8, 32 if arch != "view" else 8)
    with torch.no_grad():
        want = model(x)
    got = []
    handle = model.register_forward_hook(lambda m, i, o: got.append(o.clone()))
    try:
        maps = fm.capture(model, x, layers="all", stop_early=False)
    finally:
        handle.remove()
    torch.testing.assert_close(got[0], want, rtol=0, atol=0)
    if arch == "view":
        with torch.no_grad():
            torch.testing.assert_close(maps["conv"].tensor, model.conv(x))
        assert maps["conv"].tensor.min() < 0


class ExplodingReLU(nn.ReLU):
    def forward(self, x):
        assert self.inplace is False, "featuremaps runs it out of place for this call"
        raise RuntimeError("relu exploded")


def test_inplace_flag_restored_when_an_inplace_module_raises():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), ExplodingReLU(inplace=True))
    with pytest.raises(RuntimeError, match="relu exploded"):
        fm.capture(model, torch.randn(1, 3, 8, 8), layers="all")
    assert model[1].inplace is True
    assert no_hooks_left(model)


def test_forward_code_that_writes_into_outputs_is_learned_once():
    torch.manual_seed(0)
    model = get_model("resnet18", weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = fm.capture(model, x, layers="all", stop_early=False)
        assert len(calls) == 2, "the first capture finds ResNet's `out += identity` and runs again"
        second = fm.capture(model, x, layers="all", stop_early=False)
        assert len(calls) == 3, "later captures copy those outputs right away"
    finally:
        handle.remove()
    for name in first:
        torch.testing.assert_close(first[name].tensor, second[name].tensor, rtol=0, atol=0)


def test_an_output_passed_on_as_the_same_object_survives_an_inplace_relu():
    # Identity (and Dropout in eval mode) hand on the very tensor they got: two captures of one
    # object, then an in-place ReLU on it
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Identity(), nn.Dropout(), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1)
    ).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        conv = model[0](x)
        want_out = model(x)
    for _ in range(2):  # learning pass, then the steady state
        maps = fm.capture(model, x, layers="all")
        assert conv.min() < 0
        for name in ("0", "1", "2"):
            torch.testing.assert_close(maps[name].tensor, conv, rtol=0, atol=0)
        torch.testing.assert_close(maps["3"].tensor, conv.clamp(min=0), rtol=0, atol=0)
        torch.testing.assert_close(maps["4"].tensor, want_out, rtol=0, atol=0)
    assert model[3].inplace is True and no_hooks_left(model)


class UsesAnOutsideModule(nn.Module):
    """Calls a module that is not one of its submodules (kept in a plain list)."""

    def __init__(self, outside: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.outside = [outside]

    def forward(self, x):
        return self.outside[0](self.conv(x))


def test_modules_outside_the_model_are_not_captured():
    torch.manual_seed(0)
    model = UsesAnOutsideModule(nn.Conv2d(2, 2, 1)).eval()
    maps = fm.capture(model, torch.randn(1, 3, 8, 8), layers="all")
    assert maps.names == ["conv"]
    assert no_hooks_left(model) and no_hooks_left(model.outside[0])


def test_captures_of_two_models_in_two_threads_do_not_mix():
    import threading

    torch.manual_seed(0)
    models = [get_model("resnet18", weights=None).eval(), get_model("vgg11", weights=None).eval()]
    xs = [torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)]
    alone = [fm.capture(m, x, layers="all") for m, x in zip(models, xs)]
    results: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(4):
                results[i].append(fm.capture(models[i], xs[i], layers="all"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in (0, 1):
        for maps in results[i]:
            assert maps.names == alone[i].names
            for name in maps:
                torch.testing.assert_close(maps[name].tensor, alone[i][name].tensor, rtol=0, atol=0)
        assert no_hooks_left(models[i])


class SmallVgg(nn.Module):
    """VGG's shape in small: in-place ReLUs after each conv, a pool, a head."""

    def __init__(self):
        super().__init__()

        def block(c_in: int, c: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(3, 16), *block(16, 16), nn.MaxPool2d(2), *block(16, 32), *block(32, 32))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_one_model_captured_from_several_threads_at_once():
    # A pass flips the model's inplace flags and hooks it while it runs: without one pass at a time
    # per model, the threads' passes ran each other's ReLUs in place and most maps came out wrong.
    import threading

    torch.manual_seed(0)
    model = SmallVgg().eval()
    x = torch.randn(1, 3, 96, 96)
    jobs = {
        "conv": lambda: fm.capture(model, x, layers="conv"),
        "all": lambda: fm.capture(model, x, layers="all"),
        "hooked": lambda: fm.capture(model, x, layers="all", stop_early=False),
        "chain": lambda: fm.capture(model, x, mode="conv-relu"),
        "layers": lambda: fm.list_layers(model, size=96),
    }
    alone = {k: job() for k, job in jobs.items()}
    wrong: list[str] = []
    errors: list[BaseException] = []

    def work(key: str) -> None:
        try:
            for _ in range(15):
                got = jobs[key]()
                if key == "layers":
                    if got != alone[key]:
                        wrong.append(key)
                elif got.names != alone[key].names or any(
                    not torch.equal(got[n].tensor, alone[key][n].tensor) for n in got.names
                ):
                    wrong.append(key)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in [*jobs, "conv", "all"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU)) and no_hooks_left(model)
    assert not model.training


def test_what_captures_learned_is_dropped_when_the_model_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(inplace=True)).eval()
    x = torch.randn(1, 3, 8, 8)
    assert fm.capture(model, x, layers="conv").names == ["0"]
    learned = _LEARNED[model]
    assert fm.capture(model, x, layers="conv").names == ["0"] and _LEARNED[model] is learned
    model[1] = nn.Conv2d(2, 2, 1)  # a new module tree: selections and schedules start again
    maps = fm.capture(model, x, layers="conv")
    assert maps.names == ["0", "1"] and _LEARNED[model] is not learned
    with torch.no_grad():
        torch.testing.assert_close(maps["1"].tensor, model(x))
    # deeper changes: a module added inside a child, and an in-place flag turned on by the user
    model[0] = nn.Sequential(nn.Conv2d(3, 2, 3))
    assert fm.capture(model, x, layers="conv").names == ["0.0", "1"]
    model[0].add_module("act", nn.ReLU(inplace=False))
    maps = fm.capture(model, x, layers="all")
    assert maps.names == ["0.0", "0.act", "1"]
    model[0].act.inplace = True  # same tree, new flag: the guard must see it
    maps = fm.capture(model, x, layers="all")
    assert maps["0.0"].tensor.min() < 0, "the in-place ReLU overwrote the captured conv output"
    assert model[0].act.inplace is True and no_hooks_left(model)


# -- a plain nn.Sequential's children called by the pass itself ------------------------------------
class Probe(nn.Module):
    """A leaf that records how many global forward hooks exist while it runs (1: the capture went
    through torch's hook machinery; 0: the pass called the children itself)."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def forward(self, x):
        from torch.nn.modules import module as torch_module

        self.seen.append(len(torch_module._global_forward_hooks))
        return x


class OwnForward(nn.Sequential):
    def forward(self, x):  # not torch's own forward: the pass may not call the children itself
        return super().forward(x)


def test_sequential_children_are_called_directly_with_the_same_results():
    torch.manual_seed(0)
    model = get_model("vgg11", weights=None).eval()
    seen: list[int] = []
    model.features.insert(1, Probe(seen))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    seen.clear()
    first = fm.capture(model, x, layers="conv")  # learns the schedule, through hooks
    fast = fm.capture(model, x, layers="conv")  # calls the children itself
    hooked = fm.capture(model, x, layers="conv", stop_early=False)
    assert seen == [1, 0, 1]
    assert fast.names == hooked.names == first.names and len(fast) == 8
    for name in hooked:
        assert torch.equal(fast[name].tensor, hooked[name].tensor), name
        assert fast[name].tensor.min() < 0, f"{name} lost its negative values to an in-place ReLU"
    reduced = fm.capture(model, x, layers="conv", reduce="max")
    assert seen[-1] == 0 and reduced.names == fast.names
    torch.testing.assert_close(reduced["features.0"].tensor, hooked["features.0"].tensor.amax(dim=1))
    assert no_hooks_left(model) and all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_sequential_fast_path_steps_aside_for_other_hooks_and_other_forwards():
    torch.manual_seed(0)
    seen: list[int] = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Probe(seen), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3)).eval()
    x = torch.randn(1, 3, 12, 12)
    fm.capture(model, x, layers="conv")
    assert fm.capture(model, x, layers="conv")["0"].tensor.min() < 0 and seen == [1, 0]
    # someone else's hook on a child: it must run where torch runs it, so the pass uses hooks
    handle = model[0].register_forward_hook(lambda m, i, o: o * 0 + 7)
    try:
        maps = fm.capture(model, x, layers="conv")
    finally:
        handle.remove()
    assert seen[-1] == 1
    assert maps["0"].tensor.min() < 0, "the capture hook runs before the user's hook, as torch orders them"
    torch.testing.assert_close(maps["3"].tensor, model[3](torch.full((1, 4, 10, 10), 7.0)))
    # a Sequential with its own forward, and a child called twice: hooks
    seen.clear()
    other = OwnForward(nn.Conv2d(3, 4, 3), Probe(seen)).eval()
    fm.capture(other, x, layers="all"), fm.capture(other, x, layers="all")
    relu = nn.ReLU()
    shared = nn.Sequential(nn.Conv2d(3, 4, 3), relu, Probe(seen), relu).eval()
    fm.capture(shared, x, layers="all"), fm.capture(shared, x, layers="all")
    assert seen == [1, 1, 1, 1]
    assert no_hooks_left(model) and no_hooks_left(other) and no_hooks_left(shared)


class Doubler(nn.Module):
    def forward(self, x):
        return x.mul_(2)  # writes into its input without an ``inplace`` flag


def test_sequential_fast_path_keeps_outputs_that_a_child_writes_into():
    torch.manual_seed(0)
    seen: list[int] = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Doubler(), Probe(seen), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        conv = model[0](x)
        want = model[3](conv * 2)
    for _ in range(3):
        maps = fm.capture(model, x, layers="conv")
        torch.testing.assert_close(maps["0"].tensor, conv, rtol=0, atol=0)
        torch.testing.assert_close(maps["3"].tensor, want, rtol=0, atol=0)
    assert seen[-1] == 0  # (after the first captures learned what to copy)


class SometimesCallsForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1))
        self.direct = False

    def forward(self, x):
        if self.direct:
            return self.features.forward(x)  # no __call__: a pre-hook on features does not run
        return self.features(x)


def test_sequential_fast_path_falls_back_when_the_sequential_is_not_called():
    torch.manual_seed(0)
    model = SometimesCallsForward().eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        conv = model.features[0](x)
    fm.capture(model, x, layers="conv"), fm.capture(model, x, layers="conv")  # learned: the fast path applies
    model.direct = True
    for _ in range(2):
        maps = fm.capture(model, x, layers="conv")
        assert maps.names == ["features.0", "features.2"]
        torch.testing.assert_close(maps["features.0"].tensor, conv, rtol=0, atol=0)
    assert no_hooks_left(model)


class _Shared(torch.nn.Module):
    """One ReLU module called twice, on outputs of different widths (a ResNet-style shared ReLU)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 2, 3, padding=1)
        self.b = torch.nn.Conv2d(2, 5, 3, padding=1)
        self.shared = torch.nn.ReLU()
        self.unused = torch.nn.Linear(4, 4)  # never called by forward()

    def forward(self, x):
        return self.shared(self.b(self.shared(self.a(x))))


def test_list_layers_lists_each_call_and_what_is_never_called():
    torch.manual_seed(0)
    rows = {r.name: r for r in fm.list_layers(_Shared(), size=8)}
    assert rows["shared"].output_shape == (1, 2, 8, 8) and rows["shared"].call == 1 and rows["shared"].calls == 2
    assert rows["shared#2"].output_shape == (1, 5, 8, 8) and rows["shared#2"].call == 2
    assert rows["unused"].calls == 0 and rows["unused"].output_shape is None and not rows["unused"].called
    assert [r.index for r in rows.values()] == list(range(len(rows)))
    only = fm.list_layers(_Shared(), size=8, layers="shared#2")
    assert [r.name for r in only] == ["shared#2"]


def test_a_call_key_selects_that_call_alone():
    torch.manual_seed(0)
    model = _Shared()
    x = torch.randn(1, 3, 8, 8)
    both = fm.capture(model, x, layers="shared")
    assert both.names == ["shared", "shared#2"]
    second = fm.capture(model, x, layers="shared#2")
    assert second.names == ["shared#2"] and second["shared#2"].index == 0 and second["shared#2"].call == 2
    assert torch.equal(second["shared#2"].tensor, both["shared#2"].tensor)
    assert fm.select_layers(model, "a,shared#2") == ["a", "shared#2"]
    assert fm.capture(model, x, layers="shared,shared#2").names == ["shared", "shared#2"]  # all calls win
    with pytest.raises(LayerError, match=r"shared#3 does not exist: shared is called 2 times per pass"):
        fm.capture(model, x, layers="shared#3")


def test_the_first_call_alone_is_selected_and_the_pass_stops_after_it():
    """``shared#1`` is the first call only (it used to widen to ``shared``, every call), and once the
    model has been seen at the shape the pass ends there: ``b`` never runs."""
    torch.manual_seed(0)
    model = _Shared()
    x = torch.randn(1, 3, 8, 8)
    assert fm.select_layers(model, "shared#1") == ["shared#1"]
    both = fm.capture(model, x, layers="shared")
    b_calls = []
    handle = model.b.register_forward_hook(lambda *a: b_calls.append(1))
    try:
        for _ in range(2):
            first = fm.capture(model, x, layers="shared#1")
            assert first.names == ["shared"] and first["shared"].call == 1
            assert torch.equal(first["shared"].tensor, both["shared"].tensor)
        assert b_calls == []  # the schedule was learned by the first capture above
        g = fm.capture_for_grad(model, x, layers="shared#1")
        assert list(g.outputs) == ["shared"] and g.output is None and b_calls == []
        # a later call still runs the model up to that call
        assert fm.capture(model, x, layers="a,shared#2").names == ["a", "shared#2"] and len(b_calls) == 1
        assert [r.name for r in fm.list_layers(model, size=8, layers="shared#1")] == ["shared"]
    finally:
        handle.remove()


def test_maps_of_a_batch_need_a_sample_and_stats_are_per_image():
    torch.manual_seed(0)
    model = _Shared()
    x = torch.randn(3, 3, 8, 8)
    x[1] *= 10  # image 1 is ten times brighter
    for reduce in (None, "mean"):
        maps = fm.capture(model, x, layers="a", reduce=reduce)
        e = maps["a"]
        with pytest.raises(LayerError, match=r"a holds a batch of 3 images; pass sample=0\.\.2"):
            e.maps() if reduce is None else e.reduced("mean")
        table = maps.stats()
        assert [(r.name, r.sample) for r in table] == [("a", 0), ("a", 1), ("a", 2)]
        for i, row in enumerate(table):
            alone = fm.capture(model, x[i : i + 1], layers="a")["a"].stats
            assert row.shape == (1, 2, 8, 8)
            assert (row.min, row.max, row.mean) == pytest.approx((alone.min, alone.max, alone.mean), rel=1e-5)
        assert table[1].max > 5 * table[0].max
        assert "image" in str(table).splitlines()[0]
    one = fm.capture(model, x[:1], layers="a")
    assert one["a"].maps().shape == (2, 8, 8) and [r.sample for r in one.stats()] == [None]


def test_channel_stats_in_the_hook_equal_those_of_the_full_maps():
    model = fm.load_model("resnet18", weights="random", size=64)
    x = torch.randn(2, 3, 64, 64)
    full = fm.capture(model, x, layers="layer3,layer4")
    small = fm.capture(model, x, layers="layer3,layer4", reduce="channel-stats")
    for name in ("layer3", "layer4"):
        e, s = full[name], small[name]
        assert s.reduction == "channel-stats" and s.shape == e.shape and s.tensor.shape == (2, e.shape[1], 3)
        flat = e.tensor.flatten(2)
        assert torch.equal(s.tensor[..., 0], flat.amax(dim=2))
        assert torch.allclose(s.tensor[..., 1], flat.mean(dim=2))
        where = s.tensor[..., 2].long()
        assert torch.equal(flat.gather(2, where[..., None])[..., 0], flat.amax(dim=2))  # the max sits there
        with pytest.raises(LayerError, match="no statistics were kept with reduce='channel-stats'"):
            _ = s.stats


def test_capture_for_grad_gives_the_gradients_of_the_real_computation():
    import copy

    torch.manual_seed(0)
    model = fm.load_model("resnet18", weights="random", size=64)
    reference = copy.deepcopy(model.module).eval()
    for m in reference.modules():  # the oracle: the same model with every in-place op out of place
        if hasattr(m, "inplace"):
            m.inplace = False
    x = torch.randn(1, 3, 64, 64)
    g = fm.capture_for_grad(model, x, layers="layer4,layer1.0.bn2", stop_early=False)
    assert set(g.outputs) == {"layer4", "layer1.0.bn2"} and g.output.shape == (1, 1000)
    (grad,) = torch.autograd.grad(g.output[0, 7], g.outputs["layer4"])
    kept = {}
    h = reference.layer4.register_forward_hook(lambda m, i, o: kept.setdefault("a", o))
    try:
        logits = reference(x)
    finally:
        h.remove()
    (expected,) = torch.autograd.grad(logits[0, 7], kept["a"])
    assert torch.allclose(g.output, logits) and torch.allclose(grad, expected, atol=1e-6)
    # bn2's output is written into by `out += identity`: the capture keeps what bn2 returned
    plain = fm.capture(model, x, layers="layer1.0.bn2")["layer1.0.bn2"].tensor
    assert torch.allclose(g.outputs["layer1.0.bn2"].detach(), plain)
    # the model is left as it was, parameters without gradients
    assert all(p.grad is None for p in model.module.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.module.modules())
    assert all(getattr(m, "inplace", True) for m in model.module.modules() if hasattr(m, "inplace"))


def test_capture_for_grad_stops_after_the_last_wanted_layer():
    model = fm.load_model("vgg11", weights="random", size=32)
    ran = []
    h = model.module.classifier.register_forward_hook(lambda *a: ran.append("classifier"))
    try:
        x = torch.randn(1, 3, 32, 32, requires_grad=True)
        fm.capture_for_grad(model, x, layers="features.3")  # first pass learns where to stop
        ran.clear()
        g = fm.capture_for_grad(model, x, layers="features.3")
        assert g.output is None and ran == []
        assert (g.outputs["features.3"] < 0).any()  # the in-place ReLU after it wrote into a copy, not the capture
        (gx,) = torch.autograd.grad(g.outputs["features.3"][0, 2].mean(), x)
        assert gx.abs().sum() > 0
    finally:
        h.remove()
