"""What one pass over a model's linear layers costs per row count, in each CPU weight layout.

Weights are distinct per layer (as in the model), so each pass streams them from memory instead of
reusing a cached copy. Compares `x @ w.t()` (MKL on the [out, in] weight), `x @ w_t` (a contiguous
[in, out] copy) and oneDNN on its packed copy, the three layouts kernels/ops.py chooses between.
Usage: OMP_NUM_THREADS=2 python scripts/linear_layouts.py [--rows 1,2,4,8,16] [--reps 7]
Defaults: SmolLM2-135M's shapes (30 layers; fused q/k/v, o, fused gate/up, down; LM head).
"""

from __future__ import annotations

import argparse

import torch
from drafter_cost import median_ms   # scripts/ is on sys.path when a script runs

SMOLLM2_LAYER = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
SMOLLM2_LM_HEAD = (49152, 576)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,3,4,8,16,32")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    g = torch.Generator().manual_seed(0)
    groups = {"layers": [torch.randn(shape, generator=g) for _ in range(args.layers)
                         for shape in SMOLLM2_LAYER.values()],
              "lm_head": [torch.randn(SMOLLM2_LM_HEAD, generator=g)]}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms per pass")
    for name, weights in groups.items():
        transposed = [w.t().contiguous() for w in weights]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
        print(f"{name:8} {'rows':>4} {'x @ w.t()':>10} {'x @ w_t':>10} {'oneDNN':>10}")
        for m in rows:
            xs = [torch.randn(m, w.shape[1], generator=g) for w in weights]
            plain = median_ms(lambda: [x @ w.t() for x, w in zip(xs, weights)], args.reps)
            trans = median_ms(lambda: [x @ w for x, w in zip(xs, transposed)], args.reps)
            dnnl = median_ms(lambda: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                                  for x, w in zip(xs, packed)], args.reps)
            print(f"{'':8} {m:>4} {plain:>10.1f} {trans:>10.1f} {dnnl:>10.1f}")


if __name__ == "__main__":
    main()
