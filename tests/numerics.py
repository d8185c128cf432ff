"""DESIGN.md's numerics rule, in one place.

max|x - ref| <= r * max|x_lowp - ref| + atol, atol = 2 * max|(ref + 0.3 - 0.3) - ref|,
r = 2 (3 with softcap). NaN never passes; shapes must match.
"""
import torch


def assert_close_rule(name, x, ref, x_lowp, softcap=False):
    """x: the tested result; ref: fp32 reference; x_lowp: the reference run in the input dtype."""
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != reference {tuple(ref.shape)}"
    x, ref, x_lowp = x.float(), ref.float(), x_lowp.float()
    finite = torch.isfinite(ref)
    # Positions where the reference itself is +-inf (lse of an empty row) must match exactly.
    assert torch.equal(x[~finite], ref[~finite]), f"{name}: non-finite entries differ from the reference"
    x, ref, x_lowp = x[finite], ref[finite], x_lowp[finite]
    assert not torch.isnan(x).any(), f"{name}: NaN in result"
    if ref.numel() == 0:
        return
    r = 3.0 if softcap else 2.0
    atol = 2 * ((ref + 0.3 - 0.3) - ref).abs().max().item()
    err = (x - ref).abs().max().item()
    base = (x_lowp - ref).abs().max().item()
    assert err <= r * base + atol, (
        f"{name}: max err {err:.3e} > {r} * lowp err {base:.3e} + atol {atol:.3e}")
