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


MAX_POOL_TRAINING = """
import copy
import torch
import memopt
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.MaxPool2d(3, 2, 1), torch.nn.Flatten(), torch.nn.Linear(64, 2))
reference = copy.deepcopy(model)
x = torch.randn(2, 3, 10, 10)
memopt.compile(model, lowering="eager")(x).sum().backward()
reference(x).sum().backward()
for p, q in zip(model.parameters(), reference.parameters()):
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
print("ok")
"""


def test_eager_lowering_in_a_fresh_process_decomposes_max_pool():
    """Inductor's max-pool decomposition looks up ``torch._inductor.lowering``, which only
    Inductor's compiler imports: the eager lowering must import it too (in this test process
    some other test has already, hence the fresh interpreter)."""
    completed = subprocess.run(
        [sys.executable, "-c", MAX_POOL_TRAINING], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split() == ["ok"]
