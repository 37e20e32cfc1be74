"""model.training.optim: adamw, and clip_and_step against clip_grad_norm_ followed by step()."""
import math

import pytest
import torch

from conftest import reference_adamw, small
from model import GPT, TrainConfig
from model.training.optim import adamw, clip_and_step, lr_at


def _twin_runs(max_norm: float, fused: bool, grad_gain: float, steps: int = 4):
    """The same model trained by clip_grad_norm_ + step() and by clip_and_step; gradients scaled by grad_gain
    so that clipping bites (large) or not (small). Returns both models, norms and final gradients."""
    torch.manual_seed(0)
    a, b = GPT(small()), GPT(small())
    b.load_state_dict(a.state_dict())
    opts = []
    for model in (a, b):
        opts.append(reference_adamw(model, 1e-2, 0.1, (0.9, 0.99), fused=fused))
    x = torch.randint(0, 31, (3, 16))
    norms = {"reference": [], "ours": []}
    for _ in range(steps):
        for name, model, opt in (("reference", a, opts[0]), ("ours", b, opts[1])):
            (model(x, x)[1] * grad_gain).backward()
            if name == "reference":
                norms[name].append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
                opt.step()
            else:
                norms[name].append(clip_and_step(opt, max_norm).item())
            grads = [p.grad.clone() for p in model.parameters()]
            opt.zero_grad(set_to_none=True)
            if name == "reference":
                ref_grads = grads
    return a, b, norms, ref_grads, grads, opts[1]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("grad_gain", [100.0, 1e-3])  # clipped every step / never clipped
def test_clip_and_step_matches_clip_grad_norm_then_step(fused, grad_gain):
    a, b, norms, ref_grads, grads, opt = _twin_runs(1.0, fused, grad_gain)
    assert norms["ours"] == pytest.approx(norms["reference"], rel=1e-5)
    clipped = norms["reference"][-1] > 1.0
    assert clipped == (grad_gain > 1)  # the two cases really differ
    for ga, gb in zip(ref_grads, grads):  # the gradients are left clipped, as clip_grad_norm_ leaves them
        torch.testing.assert_close(gb, ga, atol=1e-7, rtol=1e-5)
    if clipped:
        assert math.sqrt(sum((g.double() ** 2).sum().item() for g in grads)) == pytest.approx(1.0, rel=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, atol=1e-6, rtol=1e-5)
    assert not hasattr(opt, "grad_scale")  # not left behind for a later unclipped step()


def test_no_clipping_is_a_plain_step():
    torch.manual_seed(0)
    a, b = GPT(small()), GPT(small())
    b.load_state_dict(a.state_dict())
    opt_a = adamw(a, 1e-2, 0.1, (0.9, 0.99), "cpu")
    opt_b = adamw(b, 1e-2, 0.1, (0.9, 0.99), "cpu")
    x = torch.randint(0, 31, (3, 16))
    for model, opt, step in ((a, opt_a, lambda o: o.step()), (b, opt_b, lambda o: clip_and_step(o, 0.0))):
        (model(x, x)[1] * 100).backward()
        assert step(opt) is None
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_parameters_without_gradients_are_left_out_and_untouched():
    w, unused = torch.nn.Parameter(torch.tensor([3.0, 4.0])), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([w, unused], lr=0.1, fused=True)
    w.grad = torch.tensor([30.0, 40.0])
    assert clip_and_step(opt, 5.0).item() == 50.0
    torch.testing.assert_close(w.grad, torch.tensor([3.0, 4.0]))  # clipped to norm 5
    assert torch.equal(unused, torch.ones(2)) and unused.grad is None
    assert clip_and_step(torch.optim.AdamW([unused], lr=0.1, fused=True), 1.0) is None  # no gradient at all


def test_non_finite_gradients_behave_as_with_clip_grad_norm_():
    for bad in (math.inf, math.nan):
        ws = [torch.nn.Parameter(torch.tensor([1.0, 2.0])) for _ in range(2)]
        for w in ws:
            w.grad = torch.tensor([bad, 1.0])
        ref = torch.nn.utils.clip_grad_norm_([ws[0]], 1.0)
        torch.optim.AdamW([ws[0]], lr=0.1, fused=True).step()
        ours = clip_and_step(torch.optim.AdamW([ws[1]], lr=0.1, fused=True), 1.0)
        assert torch.equal(ours.isnan(), ref.isnan()) and torch.equal(ours.isinf(), ref.isinf())
        torch.testing.assert_close(ws[1], ws[0], equal_nan=True)


def test_negative_max_norm_is_an_error():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match="-1.0"):
        clip_and_step(opt, -1.0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_adamw_is_fused_over_the_models_groups_and_matches_the_for_loop_reference(device):
    """adamw: torch's fused AdamW (one kernel over all tensors) over GPT.optim_groups, decay on 2-D weights only;
    its updates match the for-loop reference's over groups built independently."""
    torch.manual_seed(0)
    a = GPT(small()).to(device)
    b = GPT(small()).to(device)
    b.load_state_dict(a.state_dict())
    ours, ref = adamw(a, 1e-2, 0.1, (0.9, 0.99), device), reference_adamw(b, 1e-2, 0.1, (0.9, 0.99))
    assert type(ours) is torch.optim.AdamW and ours.defaults["fused"] is True
    assert [g["weight_decay"] for g in ours.param_groups] == [0.1, 0.0]
    assert [{id(p) for p in g["params"]} for g in ours.param_groups] == \
        [{id(p) for p in a.parameters() if p.dim() >= 2}, {id(p) for p in a.parameters() if p.dim() < 2}]
    x = torch.randint(0, 31, (3, 16), device=device)
    for _ in range(4):
        for model, opt in ((a, ours), (b, ref)):
            (model(x, x)[1] * 50).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4)


def test_linear_schedule_by_hand():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=2, max_iters=12, lr_schedule="linear")
    assert [lr_at(s, cfg) for s in range(2)] == [0.5, 1.0]
    assert lr_at(2, cfg) == pytest.approx(1.0)
    assert lr_at(7, cfg) == pytest.approx(0.55)  # halfway from step 2 to step 12
    assert lr_at(12, cfg) == pytest.approx(0.1) and lr_at(50, cfg) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="'step'"):
        TrainConfig(lr_schedule="step")
