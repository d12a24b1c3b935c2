"""--lora-dropout-mask bits16: the keep mask from 16 random bits an element is Bernoulli(1 - p) up to p's rounding to
2**-16 at every position of a 64-bit draw, scales forward and backward like ATen's dropout, and eager and traced
calls draw the same mask from the same generator state (so compiled runs, resume and eager agree)."""

import pytest
import torch

from relora_dist import ReLoRAConfig, wrap
from relora_dist.methods.relora.dropout import bits16_dropout, bits16_keep_mask, bits16_threshold, lora_input_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 1 / 3])
def test_the_threshold_keeps_one_minus_p_rounded_to_two_to_the_minus_16(p):
    every_int16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    kept = (every_int16 >= bits16_threshold(p)).sum().item()
    assert kept == 2**16 - round(p * 2**16) and abs(kept / 2**16 - (1 - p)) <= 2**-17


def test_every_16_bit_slot_of_a_draw_is_an_independent_bernoulli():
    """Each of the four int16 slots of a 64-bit word keeps 1 - p (a draw of 63 bits would keep all of the top slot),
    and neighbouring slots are independent (a repeated half-word would correlate them)."""
    p = 0.1
    torch.manual_seed(0)
    mask = bits16_keep_mask((1 << 22,), p, "cpu").view(-1, 4).float()
    sigma = ((1 - p) * p / mask.shape[0]) ** 0.5
    for slot in range(4):
        assert abs(mask[:, slot].mean().item() - (1 - p)) < 6 * sigma, slot
    for a, b in ((0, 1), (1, 2), (2, 3)):
        assert abs((mask[:, a] * mask[:, b]).mean().item() - (1 - p) ** 2) < 6 * sigma, (a, b)


@pytest.mark.parametrize("shape", [(37, 11), (4, 5, 6), (3,)])
def test_output_and_gradient_are_the_kept_inputs_over_one_minus_p(shape):
    p = 0.25
    x = torch.randn(shape, requires_grad=True)
    torch.manual_seed(1)
    out = lora_input_dropout(x, p, "bits16")
    torch.manual_seed(1)
    mask = bits16_keep_mask(shape, p, "cpu")
    out.backward(torch.ones_like(out))
    assert 0 < mask.sum() < mask.numel()
    torch.testing.assert_close(out, torch.where(mask, x.detach() / (1 - p), 0.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, mask / (1 - p), rtol=1e-6, atol=0)


def test_the_traced_op_draws_what_eager_draws():
    """The custom op (what a trace keeps) and the eager path consume the generator alike and agree exactly."""
    x = torch.randn(300, 40, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(bits16_dropout, (x, 0.1))
    torch.manual_seed(2)
    traced, mask = bits16_dropout(x, 0.1)
    torch.manual_seed(2)
    eager = lora_input_dropout(x, 0.1, "bits16")
    assert traced.dtype == eager.dtype == torch.bfloat16 and mask.dtype == torch.bool
    assert torch.equal(traced, eager)


def test_a_relora_layer_applies_the_mask_in_training_only():
    torch.manual_seed(0)
    model = wrap(torch.nn.Sequential(torch.nn.Linear(24, 16)),
                 ReLoRAConfig(rank=4, alpha=8, dropout=0.3, dropout_mask="bits16", target_modules=("0",)))
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 24)
    torch.manual_seed(3)
    trained = layer(x)
    torch.manual_seed(3)
    dropped = x * bits16_keep_mask(x.shape, 0.3, "cpu") / 0.7
    expected = x @ layer.weight.T + layer.bias + layer.scale * (dropped @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-5)
    layer.eval()
    plain = x @ layer.weight.T + layer.bias + layer.scale * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("settings, message", [
    (dict(dropout_mask="bits8"), "lora dropout mask must be one of aten, bits16"),
    (dict(dropout_mask="bits16", fused_kernels="on"), "--lora-dropout-mask, --fused-kernels"),
])
def test_bad_mask_settings_are_one_line_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        ReLoRAConfig(rank=4, **settings)
