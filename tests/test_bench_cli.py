"""`s2conv bench` (the GPU decode benchmark): a clear refusal without a GPU, and its Markdown report."""
import subprocess
import sys

import pytest
import torch

from s2conv.bench import append_markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_bench_without_a_gpu_is_one_line_and_nonzero():
    r = subprocess.run([sys.executable, "-m", "s2conv", "bench", "--formats", "bf16"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: s2conv bench needs a CUDA GPU"


def test_results_section_names_the_card_and_every_row(tmp_path):
    result = dict(date="2026-11-26", gpu="NVIDIA H100 80GB HBM3", torch="2.11", hbm={"read": 3038.0, "copy": 3020.0},
                  prompt=256, frames=100, codec=None,
                  rows=[dict(format="q4", target="all", ms_per_frame=5.59, frames_per_s=179.0, rtf=0.12,
                             read_share=0.26),
                        dict(format="q3", target="slow", error="RuntimeError: boom")])
    out = tmp_path / "RESULTS.md"
    out.write_text("# earlier\n")
    append_markdown(str(out), result)
    text = out.read_text()
    assert text.startswith("# earlier\n") and "NVIDIA H100 80GB HBM3" in text and "3038 GB/s" in text
    assert "| q4 | all | 5.59 | 179.0 | 0.120 | 26% |" in text and "error: RuntimeError: boom" in text
