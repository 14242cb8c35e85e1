"""Width and depth for a target parameter count, per architecture family, so that a study compares
models of equal size.

Families (as the xLSTM papers name them):
    xlstm_1_0    xLSTM[1:0]: mLSTM blocks only (arch xlstm)
    xlstm_7_1    xLSTM[7:1]: one sLSTM block in every eight (arch xlstm; blocks 3, 11, 19, ... as the
                 paper's 125M model), so its depth is a multiple of 8
    xlstm_large  the xLSTM 7B block (arch xlstm_large)
    llama        the Transformer baseline (arch llama), head dim 64 (from d_model 256 on; else 32 or 16,
                 whichever divides the width)

The search: widths (multiples of `width_multiple`) and depths the family allows; among the shapes within
`tolerance` of the target (all of them if none is), the one that minimises |log(params / target)| +
0.1 |log(ratio / paper ratio)|, where ratio = width / depth and the papers' ratios are xLSTM 125M:
d 768 x 24 blocks, Llama 125M: 768 x 12, xLSTM-large 400M: 1024 x 24. So at real sizes the papers'
shapes come back (125M: xLSTM 768 x 24, Llama 768 x 12), and at toy sizes, where the embedding is
most of the model, depth and width stay sensible rather than hitting the count to the last parameter. Counts are exact (`count_params` on a meta-device model):
embedding included, a tied head counted once, the vocabulary as given.

    python -m xlp.xlstm_model.sizing --params 125e6 --vocab-size 50304
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Optional

from xlp.xlstm_model.config import ModelConfig
from xlp.xlstm_model.counts import count_params

FAMILIES = ("xlstm_1_0", "xlstm_7_1", "xlstm_large", "llama")
# d_model / num_blocks of the papers' shapes
ASPECT_WEIGHT = 0.1  # how much a shape off the papers' width/depth ratio counts against one off the target
ASPECT = {"xlstm_1_0": 768 / 24, "xlstm_7_1": 768 / 24, "xlstm_large": 1024 / 24, "llama": 768 / 12}


@dataclass
class Sized:
    family: str
    params: int
    model: dict[str, Any]  # the model.* keys that give this shape

    def overrides(self) -> list[str]:
        """As command-line / study-variant overrides (`model.d_model=512`, ...)."""
        out = []
        for k, v in self.model.items():
            value = "[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else str(v)
            out.append(f"model.{k}={value}")
        return out


def family_shape(family: str, d_model: int, num_blocks: int) -> dict[str, Any]:
    """The model.* keys of `family` at this width and depth (heads and sLSTM positions by its rule)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")
    if family == "llama":
        # head dim 64 as in the papers' baselines; narrower where the width is small or not a multiple of 64
        head_dim = next((h for h in (64, 32, 16, 8) if d_model % h == 0 and (h < 64 or d_model >= 256)), 2)
        return {"arch": "llama", "d_model": d_model, "num_blocks": num_blocks, "num_heads": max(1, d_model // head_dim),
                "slstm_at": []}
    if family == "xlstm_large":
        return {"arch": "xlstm_large", "d_model": d_model, "num_blocks": num_blocks, "num_heads": 4, "slstm_at": []}
    slstm = [i for i in range(num_blocks) if i % 8 == 3] if family == "xlstm_7_1" else []
    return {"arch": "xlstm", "d_model": d_model, "num_blocks": num_blocks, "num_heads": 4, "slstm_at": slstm,
            "slstm_num_heads": 4}


def _depths(family: str, max_blocks: int) -> range:
    return range(8, max_blocks + 1, 8) if family == "xlstm_7_1" else range(2, max_blocks + 1)


def match_params(family: str, target: float, *, vocab_size: int, base: Optional[dict] = None,
                 width_multiple: int = 64, max_blocks: int = 48, tolerance: float = 0.05) -> Sized:
    """The shape of `family` closest to `target` parameters (see the module docstring). `base`: other
    model keys to keep (tie_weights, factors); width, depth, heads and sLSTM positions are chosen here.
    Per depth, widths from 1/8 to 2x the family's width/depth ratio are searched (the count grows with
    the width, so by bisection); each count is exact."""
    base = dict(base or {})
    base.setdefault("tie_weights", True)
    aspect = ASPECT[family]
    counted: dict[tuple[int, int], Optional[int]] = {}

    def params(d_model: int, num_blocks: int) -> Optional[int]:  # None: no valid model of this shape
        if (d_model, num_blocks) not in counted:
            cfg = ModelConfig(**{**base, **family_shape(family, d_model, num_blocks), "vocab_size": vocab_size})
            try:
                cfg.validate()
                counted[d_model, num_blocks] = count_params(cfg)
            except ValueError:
                counted[d_model, num_blocks] = None
        return counted[d_model, num_blocks]

    def width(units: int) -> int:
        return max(1, units) * width_multiple

    candidates: list[tuple[int, int, int]] = []  # (params, d_model, num_blocks)
    for num_blocks in _depths(family, max_blocks):
        lo = max(1, int(aspect * num_blocks / 8 / width_multiple))
        hi = max(lo + 1, int(math.ceil(aspect * num_blocks * 2 / width_multiple)))
        n_lo = params(width(lo), num_blocks)
        if n_lo is not None and n_lo > target * (1 + tolerance):
            candidates.append((n_lo, width(lo), num_blocks))
            if n_lo > 1.5 * target:
                break  # deeper models at their narrowest are bigger still
            continue
        n_hi = params(width(hi), num_blocks)
        if n_hi is not None and n_hi < target * (1 - tolerance):
            candidates.append((n_hi, width(hi), num_blocks))
            continue  # too small even at its widest: deeper
        while hi - lo > 1:  # the widest width at or below the target
            mid = (lo + hi) // 2
            n = params(width(mid), num_blocks)
            if n is not None and n <= target:
                lo = mid
            else:
                hi = mid
        for units in range(lo - 1, lo + 3):  # neighbours: divisibility rules can skip a width
            n = params(width(units), num_blocks)
            if n is not None:
                candidates.append((n, width(units), num_blocks))
    if not candidates:
        raise ValueError(f"no valid {family} shape found for {target:.3g} parameters")

    def score(c: tuple[int, int, int]) -> float:  # off the target, and (a tenth as much) off the papers' shape
        return abs(math.log(c[0] / target)) + ASPECT_WEIGHT * abs(math.log(c[1] / c[2] / aspect))

    close = [c for c in candidates if abs(c[0] / target - 1) <= tolerance]
    n, d_model, num_blocks = min(close or candidates, key=score)
    return Sized(family, n, family_shape(family, d_model, num_blocks))


def main(argv=None) -> int:
    """Print each family's shape for a target parameter count (and the overrides that give it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, nargs="+", required=True, help="target parameter counts, e.g. 125e6")
    p.add_argument("--vocab-size", type=int, required=True, help="the model's vocabulary (tokenizer's, rounded up to 64)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--width-multiple", type=int, default=64)
    p.add_argument("--max-blocks", type=int, default=48, help="deepest model considered (xlstm_7_1: a multiple of 8)")
    p.add_argument("--tolerance", type=float, default=0.05)
    a = p.parse_args(argv)
    for target in a.params:
        for fam in a.families:
            s = match_params(fam, target, vocab_size=a.vocab_size, width_multiple=a.width_multiple,
                             max_blocks=a.max_blocks, tolerance=a.tolerance)
            print(f"{target:>10.3g} {fam:12s} {s.params:>13,} ({100 * (s.params / target - 1):+5.1f}%)  "
                  f"{' '.join(s.overrides())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
