"""`torch.compile(model, backend="memopt")` works without importing memopt."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
import torch
model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
x = torch.randn(3, 5)
compiled = torch.compile(model, backend="memopt", options={"lowering": "eager"})
with torch.no_grad():
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
report = sys.modules["memopt"].last_report()
assert report is not None and report.nodes_before > 0
print("ok", "memopt" in torch._dynamo.list_backends())
"""


def test_backend_found_through_entry_point():
    completed = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split() == ["ok", "True"]
