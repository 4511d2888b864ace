"""Full CROWN alone and beside a busy process, with torch's default OpenMP wait policy and with PASSIVE, as a table.

    .venv/bin/python benchmarks/contention.py

Full CROWN margin bounds of a freshly initialised cnn-small (batch 128, ε = 0.1, torch's default threads), median of
3, each case in a fresh interpreter (the policy is read when OpenMP starts). "Beside" runs a 512×512 matrix
multiplication loop in another process for the duration, with the default policy (someone else's job).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

MEASURE = """
import time, torch
from robustprune.bounds import margin_lower_bounds
from robustprune.models import create_model
torch.manual_seed(0)
model = create_model("cnn-small", (1, 28, 28), 10).eval()
x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
margin_lower_bounds(model, x[:8], y[:8], 0.1, "crown")
times = []
for _ in range(3):
    start = time.perf_counter()
    with torch.no_grad():
        margin_lower_bounds(model, x, y, 0.1, "crown")
    times.append(time.perf_counter() - start)
print(sorted(times)[1])
"""
BUSY = """
import time, torch
a = torch.rand(512, 512)
end = time.time() + 600
while time.time() < end:
    a = (a @ a).clamp(-1, 1)
"""


def measure(policy: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", MEASURE], env=env, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def main() -> None:
    print(f"{os.cpu_count()} cores; full CROWN, fresh cnn-small, batch 128, median of 3")
    print("| OMP_WAIT_POLICY | alone | beside a busy process | slow-down |")
    print("|---|---:|---:|---:|")
    for policy in (None, "PASSIVE"):
        alone = measure(policy)
        busy = subprocess.Popen([sys.executable, "-c", BUSY],
                                env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"})
        try:
            time.sleep(2)
            beside = measure(policy)
        finally:
            busy.kill()
            busy.wait()
        print(f"| {policy or 'default'} | {alone:.2f} s | {beside:.2f} s | {beside / alone:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
