"""Where an attack step's time goes on this machine: the Madry CNN's layers, forward and input gradient.

An attack step is a forward pass and an input-gradient backward pass; when it costs almost as much as a
training step, the cause is usually a slow kernel, not Python. This times, for one batch of MNIST-shaped
inputs, the first convolution (1 input channel), the second (32 -> 64) and 2x2 max-pooling, in fp32 and
bf16, NCHW and channels_last: the forward pass, the input gradient, and (convolutions) the weight gradient.

    python bench/layer_cost.py                 # batch 128; under a minute on 2 CPU cores
    python bench/layer_cost.py --batch 256
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common import describe_machine


def best_ms(fn, repeats: int = 5, number: int = 10) -> float:
    """Fastest of ``repeats`` rounds of ``number`` calls, in ms per call (a busy moment inflates no figure)."""
    fn()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        rounds.append((time.perf_counter() - start) / number)
    return 1000 * min(rounds)


def conv_costs(batch: int, c_in: int, c_out: int, side: int, dtype: torch.dtype, layout) -> tuple[float, float, float]:
    x = torch.randn(batch, c_in, side, side, dtype=dtype).contiguous(memory_format=layout)
    w = torch.randn(c_out, c_in, 5, 5, dtype=dtype).contiguous(memory_format=layout)
    b = torch.zeros(c_out, dtype=dtype)
    grad_out = torch.randn(batch, c_out, side, side, dtype=dtype).contiguous(memory_format=layout)

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(grad_out, x, w, [c_out], [1, 1], [2, 2], [1, 1], False,
                                                           [0, 0], 1, mask)

    return (best_ms(lambda: F.conv2d(x, w, b, padding=2)), best_ms(backward([True, False, False])),
            best_ms(backward([False, True, True])))


def pool_costs(batch: int, dtype: torch.dtype, layout) -> tuple[float, float]:
    x = torch.randn(batch, 32, 28, 28, dtype=dtype).contiguous(memory_format=layout)

    def forward_backward():
        leaf = x.detach().requires_grad_(True)
        F.relu(F.max_pool2d(leaf, 2)).sum().backward()

    with torch.no_grad():
        forward = best_ms(lambda: F.max_pool2d(x, 2))
    return forward, best_ms(forward_backward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    print(describe_machine())
    print(f"Madry CNN layers, batch {args.batch}; ms per call, fastest of 5 rounds of 10\n")
    print(f"{'layer':<28} {'precision':<9} {'layout':<13} {'forward':>8} {'input grad':>11} {'weight grad':>12}")
    layouts = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for layout_name, layout in layouts.items():
            for label, (c_in, c_out, side) in (("conv1 1->32, 5x5, 28x28", (1, 32, 28)),
                                               ("conv2 32->64, 5x5, 14x14", (32, 64, 14))):
                fwd, grad_in, grad_w = conv_costs(args.batch, c_in, c_out, side, dtype, layout)
                print(f"{label:<28} {name:<9} {layout_name:<13} {fwd:>8.2f} {grad_in:>11.2f} {grad_w:>12.2f}")
            fwd, both = pool_costs(args.batch, dtype, layout)
            print(f"{'max-pool 2x2 (grad: fwd+bwd)':<28} {name:<9} {layout_name:<13} {fwd:>8.2f} {both:>11.2f} {'-':>12}")


if __name__ == "__main__":
    main()
