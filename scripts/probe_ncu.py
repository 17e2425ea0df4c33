"""Run the q4 GEMV kernels a few times at S2 Pro shapes (for `ncu`), and write their SASS to $OUT."""
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
        for name, n, k, gated in (("wqkv", 6144, 2560, False), ("w13", 9728, 2560, True)):
            p, spec = packed(fmt, n, k, gated)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            for _ in range(3):
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
