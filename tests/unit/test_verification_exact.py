"""The exact search of ``bab`` against an independent exact answer, on thousands of small random networks.

The reference is ``test_bounds_milp``'s dense MILP, written separately from ``bounds/milp.py`` (its own encoding, IBP
pre-activation bounds). On every network and margin: α-CROWN and CROWN stay below the exact minimum; ``milp.minimum``
equals it; ``milp.search`` proves exactly the margins whose minimum is positive and finds a candidate for the others.
Through ``verification.verdicts(method="bab")``: a verified image has a positive exact minimum on every margin, a
falsified one carries a point of the ball ∩ [0, 1] that the network misclassifies, and with a generous time limit no
image is left unknown; with no time left an image that needs the exact search is unknown, never verified.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from robustprune import verification
from robustprune.bounds import build_graph, margin_bounds, margin_spec
from robustprune.bounds.alpha import AlphaSettings, alpha_bounds
from robustprune.bounds import milp
from robustprune.bounds.propagate import crown_bounds, input_box, interval_pass

from test_bounds_milp import affine_layers, ibp_preactivations, milp_min_margin

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = 3


def random_case(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float]:
    """A float64 MLP (1–2 hidden layers of 3–8, about a third of them with half their weights pruned to zero), an
    input in [0, 1], a label and a radius."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_in = int(torch.randint(2, 7, (), generator=generator))
    widths = [int(w) for w in torch.randint(3, 9, (int(torch.randint(1, 3, (), generator=generator)),),
                                            generator=generator)]
    layers: list[nn.Module] = [nn.Flatten()]
    for before, after in zip([n_in] + widths, widths):
        layers += [nn.Linear(before, after), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], CLASSES)).double().eval()
    if seed % 3 == 0:
        with torch.no_grad():
            for layer in model:
                if isinstance(layer, nn.Linear):
                    layer.weight.mul_((torch.rand(layer.weight.shape, generator=generator) > 0.5).double())
    x = torch.rand(1, n_in, generator=generator, dtype=torch.float64)
    eps = float(0.02 + 0.3 * torch.rand((), generator=generator))
    with torch.no_grad():
        y = model(x).argmax(1)  # the predicted class: the margins start positive, as on a correct image
    return model, x, y, eps


def exact_minima(model: nn.Module, x: torch.Tensor, y: int, eps: float) -> np.ndarray:
    low, high = (t.flatten().numpy() for t in input_box(x, eps))
    maps = affine_layers(model, len(low))
    pre = ibp_preactivations(maps, low, high)
    return np.array([milp_min_margin(maps, pre, low, high, y, j)[0] for j in range(CLASSES) if j != y])


def encoding(model: nn.Module, x: torch.Tensor, eps: float) -> milp.Encoding:
    graph = build_graph(model)
    box = input_box(x, eps)
    shapes = {i: low.shape[1:] for i, (low, _) in interval_pass(graph, box).items()}
    chain = milp.affine_chain(graph, shapes, x.dtype)
    return milp.encode(chain, crown_bounds(graph, box, "crown", stop=graph.output - 1))


def test_bounds_and_the_program_match_the_exact_minimum_on_a_thousand_networks():
    counts = {"margins": 0, "positive": 0, "unstable": 0}
    for seed in range(1000):
        model, x, y, eps = random_case(seed)
        exact = exact_minima(model, x, int(y), eps)
        with torch.no_grad():
            bounds = margin_bounds(model, x, y, eps, ("crown", "alpha-crown"))
        for method, bound in bounds.items():
            assert np.all(bound[0].numpy() <= exact + 1e-7), f"seed {seed}: {method} {bound} above exact {exact}"
        assert np.all(bounds["alpha-crown"][0].numpy() >= bounds["crown"][0].numpy() - 1e-12)
        if seed % 2 == 0:
            check_intermediate_alpha(model, x, y, eps, exact, bounds["crown"][0].numpy(), seed)
        program = encoding(model, x, eps)
        for j, value in zip((k for k in range(CLASSES) if k != int(y)), exact):
            spec = np.eye(CLASSES)[int(y)] - np.eye(CLASSES)[j]
            assert abs(milp.minimum(program, spec) - value) <= 1e-6, f"seed {seed}: program minimum != exact"
            found = milp.search(program, spec, 30.0)
            assert found.verdict == ("verified" if value > milp.TOLERANCE else "candidate"), f"seed {seed}"
            counts["margins"] += 1
            counts["positive"] += value > 0
        counts["unstable"] += program.binaries > 0
    print(counts)
    assert counts["positive"] > 0.3 * counts["margins"] and counts["margins"] - counts["positive"] > 100
    assert counts["unstable"] > 500, "test setup: most networks should have unstable ReLUs"


def check_intermediate_alpha(model, x, y, eps, exact, crown, seed) -> None:
    """α-CROWN optimising its intermediate bounds: below the exact minimum, never looser than CROWN, and every
    pre-activation of sampled points of the ball inside the (tightest) intermediate bounds it returns."""
    graph = build_graph(model)
    box = input_box(x, eps)
    lower, tightest = alpha_bounds(graph, box, margin_spec(y, CLASSES, x.dtype), AlphaSettings(intermediate=True))
    assert np.all(lower[0].numpy() <= exact + 1e-7) and np.all(lower[0].numpy() >= crown - 1e-12), f"seed {seed}"
    points = box[0] + (box[1] - box[0]) * torch.rand(200, *x.shape[1:], dtype=x.dtype)
    values = {0: (points, points)}
    for index in range(1, graph.output + 1):
        node = graph.nodes[index]
        values[index] = node.op.interval(*(values[i] for i in node.inputs))
        if index in tightest:
            low, high = tightest[index]
            assert bool((values[index][0] >= low - 1e-9).all() and (values[index][0] <= high + 1e-9).all()), seed


def test_bab_verdicts_are_sound_and_complete_on_a_thousand_networks():
    tally = dict.fromkeys(verification.VERDICTS, 0)
    steps = set()
    for seed in range(1000, 2000):
        model, x, y, eps = random_case(seed)
        exact = exact_minima(model, x, int(y), eps)
        (result,) = verification.verdicts(model, x, y, eps, "bab", timeout=30.0)
        tally[result.verdict] += 1
        steps.add(result.decided_by)
        if result.verdict == "verified":
            assert np.all(exact > 0), f"seed {seed}: verified, but the exact minimum is {exact.min()}"
        elif result.verdict == "falsified":
            point = torch.tensor(result.counterexample, dtype=torch.float64).unsqueeze(0)
            assert (point - x).abs().max() <= eps + 1e-7 and point.min() >= 0 and point.max() <= 1
            assert int(model(point).argmax(1)[0]) == result.counterexample_label != int(y)
            assert exact.min() < 0
        assert result.verdict != "unknown" or abs(exact.min()) <= milp.TOLERANCE, f"seed {seed}: left unknown"
    print(tally, steps)
    assert tally["verified"] > 20 and tally["falsified"] > 10
    assert {"alpha-crown", "milp"} <= steps, "test setup: both the bound and the exact search should decide some"


def test_the_relu_split_search_is_sound_where_the_program_is_not_used(monkeypatch):
    monkeypatch.setattr(verification.milp, "chain_of", lambda graph, x: None)
    steps = set()
    for seed in range(2000, 2100):
        model, x, y, eps = random_case(seed)
        (result,) = verification.verdicts(model, x, y, eps, "bab", timeout=5.0)
        steps.add(result.decided_by)
        if result.verdict == "verified":
            assert np.all(exact_minima(model, x, int(y), eps) > 0), f"seed {seed}: unsound"
    assert "branches" in steps


def test_no_time_left_is_unknown_never_verified():
    for seed in range(3000, 4000):  # the first network whose proof needs the exact search
        model, x, y, eps = random_case(seed)
        (result,) = verification.verdicts(model, x, y, eps, "bab", timeout=30.0)
        if result.decided_by == "milp" and result.verdict == "verified":
            break
    else:
        pytest.fail("test setup: no network needed the exact search")
    (late,) = verification.verdicts(model, x, y, eps, "bab", timeout=1e-9)
    assert late.verdict == "unknown" and late.decided_by is None


def test_evaluate_reports_bab_beside_the_bound_methods():
    """``evaluate.verifiers: [crown, bab]``: per-method counts, bab's falsified / unknown counts and time per sample;
    bab proves at least what CROWN proves, a float32 model is verified in float64 and attacked in float32."""
    from robustprune.attacks import Threat
    from robustprune.config import eval_config
    from robustprune.data import Split
    from robustprune.evaluate import evaluate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.rand(40, 1, 2, 2)
    with torch.no_grad():
        y = model(x).argmax(1)
    cfg = eval_config(verifiers=("crown", "bab"), attacks=("pgd",), pgd_steps=20, verify_timeout=10.0,
                      masking_check=False)
    metrics = evaluate(model, Split(x, y), Threat("linf", 0.15), cfg)
    crown, bab = metrics["verification"]["crown"], metrics["verification"]["bab"]
    assert bab["verified"] + bab["falsified"] + bab["unknown"] == 40 == bab["n"] == crown["n"]
    assert bab["verified"] >= crown["verified"] and bab["falsified"] > 0 and bab["verified"] > crown["verified"]
    assert metrics["verified_by"]["bab"] == bab["verified"] / 40
    assert 0 < bab["median_s"] <= bab["worst_s"] and crown["seconds_per_sample"] > 0
    assert bab["verified"] <= round(metrics["robust_acc"] * 40) <= 40 - bab["falsified"] + bab["unknown"] + 5, \
        "PGD-20 leaves unbroken at most a few of the images bab falsifies"


def test_the_report_carries_bab_figures_and_renders_them():
    from robustprune.report import build_report, stage_table

    figures = {"crown": {"verified": 3, "n": 10, "seconds_per_sample": 0.01},
               "bab": {"verified": 6, "falsified": 2, "unknown": 2, "n": 10, "median_s": 1.25, "worst_s": 30.5}}
    report = build_report("0", {}, {"finetuned": {"verified_acc": 0.6, "verification": figures}}, {}, {})
    assert report["stages"]["finetuned"]["verification"] == figures
    assert ("Complete verification (bab), verified / falsified / unknown: finetuned: 6 / 2 / 2 of 10 (median 1.2 s, "
            "worst 30.5 s per sample)") in stage_table(report)
