"""jobs.bench_gpu runs end to end (on the CPU here, tiny) and reports what it promises, so
that the one prepared GPU check does not fail on the day a GPU is at hand."""

import json

from jobs import bench_gpu


def test_bench_gpu_runs_and_reports_every_figure(capsys):
    args = bench_gpu.get_args_parser().parse_args(
        ["--device", "cpu", "--backbone", "resnet18_layer3", "--size", "32", "--batches", "2,3",
         "--modes", "fp32,bf16_cl", "--num-attentions", "4", "--num-classes", "5",
         "--warmup", "1", "--steps", "1"])
    result = bench_gpu.main(args)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(result))  # the last line is the JSON
    assert set(result["images_per_s"]) == {"fp32@2", "bf16_cl@2", "fp32@3", "bf16_cl@3"}
    assert all(v > 0 for v in result["images_per_s"].values())
    assert result["speedup_vs_fp32"]["fp32@2"] == 1.0
    assert all(v > 0 for v in result["overhead_vs_3x_backbone"].values())
    assert set(result["augment_speedup_vs_loop"]) == {"2", "3"}
    assert result["sync_free"] is None and "skipped" in result["sync_check"]


def test_bench_gpu_skips_compiled_rows_once_the_budget_is_spent(capsys):
    args = bench_gpu.get_args_parser().parse_args(
        ["--device", "cpu", "--backbone", "resnet18_layer3", "--size", "32", "--batches", "2",
         "--modes", "fp32,bf16_cl_compile", "--num-attentions", "4", "--num-classes", "5",
         "--warmup", "1", "--steps", "1", "--budget-s", "0"])
    result = bench_gpu.main(args)
    assert result["skipped"] == ["bf16_cl_compile@2"]
    assert "skipped (time budget" in capsys.readouterr().out
