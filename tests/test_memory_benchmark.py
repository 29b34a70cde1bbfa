"""The memory benchmark runs on the engine's current structures (a small run: it reaches
into the engine's state to size it, so a change there must keep it working)."""

from benchmarks import memory


def test_memory_benchmark_sizes_every_part_of_a_small_run(capsys):
    assert memory.main(["--locations", "300", "--windows", "3", "--spans", "30"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("steady-state RSS per location:") and "2 past warm-up" in out
    for part in ("baseline sketches", "detectors, frozen between windows", "kept as columns: LatencyShift",
                 "kept as columns: ScalingShift", "code locations", "allocators' free blocks"):
        assert part in out
    assert "(latency detector; shared)" in out
