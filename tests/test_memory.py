"""Peak memory does not grow with the number of steps (each count in a fresh process)."""
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "performance.py"


def peak_rss_mib(steps, sampler):
    out = subprocess.run([sys.executable, str(SCRIPT), "--child", str(steps), sampler], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m"])
def test_peak_memory_is_flat_in_the_number_of_steps(sampler):
    # x is 4 MiB: memory kept per guided step (a leak, a fragmented heap) grows with the steps; 100 MiB is 25 x's
    assert peak_rss_mib(256, sampler) - peak_rss_mib(8, sampler) < 100
