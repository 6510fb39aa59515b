"""The DPO benchmark's labels: when its measured ratio is a CPU artifact."""

from rdpo.dev.bench.dpo import cpu_only


def test_cpu_only_when_the_cpu_only_output_layer_work_is_material():
    # The small-vocabulary shape measured 2026-12-02: TRL's every-position output layer is 1% of
    # its FLOPs, so the measured ratio stands for a GPU too.
    assert not cpu_only("cpu", 41.66e9, 41.22e9)
    # Qwen's vocabulary: most of TRL's FLOPs are positions it projects only on CPU.
    assert cpu_only("cpu", 100e9, 50e9)
    assert not cpu_only("cuda", 100e9, 50e9)  # measured on a GPU: nothing to flag
