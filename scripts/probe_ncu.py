"""Run the integer GEMV kernels a few times at S2 Pro shapes (for `ncu`), and write their SASS to $OUT.

    ncu --kernel-name int_gemv_kernel --launch-skip 2 --launch-count 1 ... python scripts/probe_ncu.py
(FMTS: formats, default q4; SHAPES: some of wqkv,wo,w13,w2, default all; CALLS: launches per shape, default 3)"""
from __future__ import annotations

import collections
import os
import re

import torch

from s2conv.runtime.kernels import INT_SPECS, REPACK, cat_rows, ops
from s2conv.runtime.kernels.triton_int import int_gemv_kernel


def packed(fmt, n, k, gated):
    spec = INT_SPECS[fmt]
    parts = []
    for _ in range(2 if gated else 1):
        codes = torch.randint(spec.code_min, spec.code_max + 1, (n, k), dtype=torch.int8, device="cuda")
        parts.append(REPACK[fmt](codes, torch.rand(n, k // spec.group, device="cuda") * 0.01))
    return cat_rows(*parts) if gated else parts[0], spec


def main():
    for fmt in os.environ.get("FMTS", "q4").split(","):
        shapes = (("wqkv", 6144, 2560, False), ("wo", 2560, 4096, False), ("w13", 9728, 2560, True),
                  ("w2", 2560, 9728, False))
        for name, n, k, gated in shapes:
            if name not in os.environ.get("SHAPES", "wqkv,wo,w13,w2").split(","):
                continue
            p, spec = packed(fmt, n, k, gated)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            for _ in range(int(os.environ.get("CALLS", "3"))):
                ops.int_linear_impl(x, p["qweight"], p["scales"], None, spec.bits, spec.offset, spec.group, gated)
            torch.cuda.synchronize()
    out = os.environ.get("OUT")
    if out:
        for key, kern in list(int_gemv_kernel.device_caches[0][0].items())[:4]:
            try:
                sass = kern.asm["sass"]
            except Exception as e:  # noqa: BLE001
                print("no sass:", e)
                sass = ""
            ops_count = collections.Counter(m.group(1).split(".")[0] for m in
                                            re.finditer(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)",
                                                        sass, re.M))
            print(kern.name, kern.n_regs, "regs", kern.n_spills, "spills", dict(ops_count.most_common(18)))
            with open(os.path.join(out, f"sass_{len(os.listdir(out))}.txt"), "w") as f:
                f.write(str(key) + "\n" + sass)


if __name__ == "__main__":
    main()
