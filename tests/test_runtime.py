"""model/training/runtime.py's allocator setting, counted in page faults (not timed)."""
import subprocess
import sys

import pytest

from conftest import ROOT


PAGE_FAULTS = """
import resource, sys, torch
from model.training.runtime import cpu_process_settings
from model.training.optim import adamw
applied = cpu_process_settings() if sys.argv[1] == "on" else False
from model import GPT, GPTConfig
torch.manual_seed(0)
# manual attention on (8, 4, 512, 512) weights: 32 MB tensors, glibc's largest mmap threshold
model = GPT(GPTConfig(vocab_size=32, block_size=512, n_layer=1, n_head=4, n_embd=32, attention="manual"))
opt = adamw(model, 1e-3, 0.0, (0.9, 0.99), "cpu")
x = torch.randint(0, 32, (8, 512))
faults = []
for _ in range(8):  # training steps
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x, x)[1].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
                    reason="the allocator setting is glibc's")
def test_cpu_process_settings_reuse_freed_memory_instead_of_faulting_it_in_again():
    """Counted, not timed, over training steps: without the setting every step maps its 32 MB attention
    weights afresh (about 58,000 page faults per step); with it, freed blocks are reused and steady-state steps
    have no page faults."""
    root = ROOT
    runs = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True, cwd=root,
                             check=True).stdout.split()
        runs[mode] = (out[0] == "True", int(out[1]))
    assert runs["on"][0] is True
    assert runs["off"][1] > 20_000  # a 32 MB tensor is 8,192 pages of 4 KiB; a step maps several
    assert runs["on"][1] < 100
