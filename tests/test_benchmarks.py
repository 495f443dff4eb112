"""Every benchmark runs at a tiny size and writes what it promises; the measuring helpers are right.

No timing is asserted here (the machine is noisy): the benchmarks report ratios, the tests check
that the numbers exist, are consistent, and that the helpers measure what they claim.
"""

import json
from pathlib import Path

import mlflow
import pytest
import torch

from benchmarks import approximation_error, attention_speed, decoding, spectral_grid
from benchmarks.common import PeakMemory
from launcher.cli import main as cli
from macformer.attention import feature_attention
from macformer.features import SpectralFeatures

REPO = Path(__file__).resolve().parents[1]


def _json(path) -> dict:
    return json.loads(path.read_text())


def test_cumsum_reference_form_equals_the_chunked_causal_form() -> None:
    q, k, v = (torch.randn(1, 2, 37, 16) * 0.5 for _ in range(3))
    feature_map = SpectralFeatures(16, 32, seed=0)
    torch.testing.assert_close(attention_speed.cumsum_causal_attention(q, k, v, feature_map, eps=0.0),
                               feature_attention(q, k, v, feature_map, causal=True, chunk_size=8),
                               atol=1e-5, rtol=1e-4)


def test_peak_memory_sees_an_allocation_and_not_what_was_held_before() -> None:
    held = torch.ones(16 * 2**20 // 4)  # 16 MiB allocated before the block
    with PeakMemory(torch.device("cpu")) as meter:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert 56 < meter.peak_mib < 90, meter.peak_mib
    assert held.sum() > 0


def test_attention_speed_at_a_tiny_size(tmp_path) -> None:
    assert attention_speed.main(["--seq-lens", "64", "128", "--kernels", "exp", "--dims", "32", "128",
                                 "--heads", "2", "--head-dim", "16", "--repeats", "1",
                                 "--output", str(tmp_path)]) == 0
    result = _json(tmp_path / "attention_speed.json")
    methods = {r["method"] for r in result["rows"]}
    assert {"softmax", "rmfa-exp-D32", "rmfa-exp-D128", "rfa-D128", "favor-D128", "cumsum-favor-D128"} <= methods
    for row in result["rows"]:
        assert row["seconds"] > 0 and row["peak_mib"] >= 0
        base = next(b for b in result["rows"] if b["method"] == "softmax" and
                    (b["causal"], b["pass"], b["seq_len"]) == (row["causal"], row["pass"], row["seq_len"]))
        assert row["speedup_vs_softmax"] == pytest.approx(base["seconds"] / row["seconds"])
    assert not any(r["method"].startswith("cumsum") and not r["causal"] for r in result["rows"])
    assert "chunked_vs_cumsum_speed_128" in result["summary"]
    assert "rmfa-exp-D128-authors-estimator" in methods  # the authors' construction, at the middle D
    for row in result["rows"]:
        if row["method"] == "softmax":  # 4 n^2 d h multiply-add FLOPs, half of them causal
            assert row["forward_flops"] == 4 * row["seq_len"] ** 2 * 16 * 2 / (2 if row["causal"] else 1)
            assert row["flop_speedup"] == 1
        if not row["method"].startswith("cumsum"):
            assert row["flop_efficiency"] == pytest.approx(row["speedup_vs_softmax"] / row["flop_speedup"])
    # The authors' construction multiplies the same rows as ours: the same FLOPs, whatever the time.
    same = {r["method"]: r["forward_flops"] for r in result["rows"] if r["seq_len"] == 128 and r["pass"] == "fwd"
            and not r["causal"]}
    assert same["rmfa-exp-D128-authors-estimator"] == same["rmfa-exp-D128"] < same["rmfa-exp-D128-plain-features"]
    for name in ("attention_seconds.png", "attention_peak_mib.png", "rmfa_speedup_heatmap.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_the_authors_construction_computes_our_features() -> None:
    from macformer.features import RandomMaclaurinFeatures

    rmfa = RandomMaclaurinFeatures(16, 64, "exp", seed=3, constant_feature=True, linear_features=True)
    x = torch.randn(2, 3, 10, 16) * 0.3
    torch.testing.assert_close(attention_speed.AuthorsEstimatorFeatures(rmfa)(x), rmfa(x), atol=1e-6, rtol=1e-5)
    without_exact = RandomMaclaurinFeatures(16, 24, "inverse", seed=3)  # degree 0 sampled, no linear block
    torch.testing.assert_close(attention_speed.AuthorsEstimatorFeatures(without_exact)(x), without_exact(x),
                               atol=1e-6, rtol=1e-5)


def test_approximation_error_at_a_tiny_size_logs_to_mlflow(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert approximation_error.main(["--kernels", "exp", "inverse", "--dims", "16", "256", "--seq-lens", "64",
                                     "--seeds", "2", "--output", str(tmp_path), "--tracking-uri", uri]) == 0
    rows = _json(tmp_path / "approximation_error.json")["rows"]
    favor = [r for r in rows if r["method"] == "favor" and r["inputs"] == "ppSBN"]
    assert favor and all(r["errors"]["256"] < r["errors"]["16"] for r in favor)
    assert any(r.get("diverges") for r in rows if r["method"] == "rmfa-inverse" and r["inputs"] == "plain")
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("macformer-benchmarks").experiment_id])
    assert run.data.tags["benchmark"] == "approximation_error"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"approximation_error.json",
                                                                        "approximation_error.png"}


def test_decoding_at_a_tiny_size(tmp_path) -> None:
    # Eager only: the compiled step is tested in test_models (compiling costs ~20 s per model on CPU).
    assert decoding.main(["--contexts", "32", "96", "--new-tokens", "3", "--d-model", "32", "--heads", "2",
                          "--layers", "1", "--num-features", "48", "--vocab-size", "50", "--modes", "eager",
                          "--output", str(tmp_path)]) == 0
    rows = _json(tmp_path / "decoding.json")["rows"]
    assert {r["mode"] for r in rows} == {"eager"}
    rmfa = [r for r in rows if r["attention"] == "rmfa"]
    softmax = [r for r in rows if r["attention"] == "softmax"]
    # The recurrent state has one size whatever the context; the KV cache grows with it.
    assert rmfa[0]["state_mib"] == rmfa[1]["state_mib"] and softmax[1]["state_mib"] > softmax[0]["state_mib"]
    for r, base in zip(rmfa, softmax, strict=True):  # the ceiling: the KV cache's time over the weight reads alone
        assert r["linear_layers_ms"] > 0
        assert r["speedup_ceiling"] == pytest.approx(base["ms_per_token"] / r["linear_layers_ms"])
    assert (tmp_path / "decoding.png").stat().st_size > 0


def test_spectral_grid_at_a_tiny_size(tmp_path) -> None:
    assert spectral_grid.main(["--num-features", "40", "--seq-len", "32", "--speed-seq-len", "64", "--heads", "1",
                               "--head-dim", "8", "--seeds", "1", "--inputs", "ppSBN",
                               "--output", str(tmp_path)]) == 0
    rows = [r for r in _json(tmp_path / "spectral_grid.json")["rows"] if "error" in r]
    assert len(rows) == 2 * 4 * 7 and all(0 < r["error"] < 1 for r in rows)
    assert (tmp_path / "spectral_grid_error.png").stat().st_size > 0


def test_bench_command_dispatches_and_refuses_bad_sizes(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(["bench", "attention_speed", "--seq-lens", "-8"])
    assert exit_info.value.code == 2 and "--seq-lens must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli(["bench", "nonexistent"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_training_throughput_plans_every_kernel_at_the_longest_length_only(tmp_path) -> None:
    from benchmarks import training

    args = training.parse_args(["throughput", "--seq-lens", "32", "64", "--kernels", "inverse", "exp",
                                "--output", str(tmp_path / "out")])
    trials = training.throughput_trials(args, {32: tmp_path / "a", 64: tmp_path / "b"}, "plan")
    assert [(t.model["attention"], t.model.get("kernel"), Path(t.data).name) for t in trials] == [
        ("softmax", None, "a"), ("rmfa", "exp", "a"), ("softmax", None, "b"), ("rmfa", "exp", "b"),
        ("rmfa", "inverse", "b")]
    assert len({t.run_name for t in trials}) == len(trials)


@pytest.mark.slow
def test_training_throughput_runs_the_trainer_and_reports_ratios(tmp_path, local_ray) -> None:
    from benchmarks import training

    # One length, no extra kernel: which variants run at which length is tested above without training.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert training.main(["throughput", "--seq-lens", "32", "--kernels", "exp", "--steps", "2",
                          "--d-model", "32", "--num-features", "40", "--stdlib-limit", "6", "--vocab-size", "600",
                          "--data-dir", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
                          "--tracking-uri", uri]) == 0
    rows = _json(tmp_path / "out" / "training_throughput.json")["rows"]
    assert sorted((r["variant"], r["seq_len"]) for r in rows) == [("rmfa-exp", 32), ("softmax", 32)]  # as asked
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["peak_memory_mb"] > 0 and row["steps"] == 2
        base = next(b for b in rows if b["variant"] == "softmax" and b["seq_len"] == row["seq_len"])
        assert row["speedup_vs_softmax"] == pytest.approx(row["tokens_per_s"] / base["tokens_per_s"])
    assert (tmp_path / "out" / "training_throughput.png").stat().st_size > 0


def test_training_quality_reports_each_variants_newest_finished_run(tmp_path, monkeypatch) -> None:
    from benchmarks import training

    monkeypatch.chdir(REPO)  # the sweep file names its base config relative to the repository root
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("quality-lm")

    def logged_run(variant: str, ppsbn: bool, perplexities: list[float], status: str = "FINISHED") -> None:
        run_id = client.create_run(experiment).info.run_id
        for key, value in {"attention": variant.split("-")[0], "variant": variant, "ppsbn": ppsbn}.items():
            client.log_param(run_id, key, value)
        for step, value in enumerate(perplexities):
            client.log_metric(run_id, "eval_perplexity", value, step=step)
        client.set_terminated(run_id, status)

    logged_run("softmax", True, [120, 80])
    logged_run("softmax", False, [90, 50])
    logged_run("rmfa-exp", True, [100, 70])
    logged_run("rmfa-exp", True, [60], status="FAILED")  # a failed re-run replaces nothing
    logged_run("favor", False, [200, 150])
    logged_run("favor", False, [100])  # a finished re-run replaces the older run
    assert training.main(["quality", "--no-train", "--sweeps", "configs/sweeps/quality_lm.yaml",
                          "--override", f"tracking_uri={uri}", "--output", str(tmp_path / "out"),
                          "--tracking-uri", uri]) == 0
    result = _json(tmp_path / "out" / "training_quality.json")
    found = {(r["variant"], r["ppsbn"]): (r["value"], r["relative_to_softmax"]) for r in result["rows"]}
    assert found == {("softmax", "True"): (80, 1.6), ("softmax", "False"): (50, 1.0),
                     ("rmfa-exp", "True"): (70, 1.4), ("favor", "False"): (100, 2.0)}
    assert result["summary"]["quality-lm_favor_no_ppsbn"] == 100
    assert result["summary"]["quality-lm_rmfa-exp_ppsbn"] == 70
    assert (tmp_path / "out" / "training_quality.png").stat().st_size > 0


@pytest.mark.slow
def test_tokenization_at_a_tiny_size(tmp_path, local_ray) -> None:
    from benchmarks import tokenization

    assert tokenization.main(["--files", "12", "--vocab-size", "600", "--output", str(tmp_path)]) == 0
    result = _json(tmp_path / "tokenization.json")
    assert len(result["rows"]) == 3 and len({r["tokens"] for r in result["rows"]}) == 1  # the same tokens
    assert (tmp_path / "tokenization.png").stat().st_size > 0


def test_sharp_attention_at_a_tiny_size(tmp_path) -> None:
    assert cli(["bench", "sharp_attention", "--steps", "4", "--eval-every", "2", "--seeds", "0", "1",
                "--tasks", "listops", "lm", "recall", "--variants", "softmax", "rmfa-exp", "--listops-train", "64",
                "--listops-valid", "32", "--lm-files", "40", "--lm-seq-len", "32", "--lm-valid-windows", "8",
                "--recall-train", "64", "--recall-positions", "8", "--batch-size", "4", "--output", str(tmp_path)]) == 0
    result = _json(tmp_path / "sharp_attention.json")
    rows = result["rows"]
    assert {(r["task"], r["variant"], r["seed"]) for r in rows} == {
        (t, v, s) for t in ("listops", "lm", "recall") for v in ("softmax", "rmfa-exp") for s in (0, 1)}
    for row in rows:
        assert [p["step"] for p in row["curve"]] == [2, 4]
        if row["task"] in ("listops", "recall"):
            assert 0 <= row["best"] <= 1 and row["best"] == max(p["metric"] for p in row["curve"])
        else:  # byte-level perplexity starts near the vocabulary size
            assert 50 < row["best"] < 400 and row["best"] == min(p["metric"] for p in row["curve"])
        if row["variant"] == "rmfa-exp":  # starts at half its bound (1.37 at D=128) and is recorded at evaluations
            assert 0.4 < row["final_temperature"] < 1.37 and row["final_approx_error"] > 0
        else:
            assert row["final_temperature"] is None and row["final_approx_error"] == 0
    lm_softmax = [r["best"] for r in rows if (r["task"], r["variant"]) == ("lm", "softmax")]
    lm_rmfa = [r["best"] for r in rows if (r["task"], r["variant"]) == ("lm", "rmfa-exp")]
    assert result["summary"]["lm_rmfa-exp_vs_softmax"] == pytest.approx(sum(lm_rmfa) / sum(lm_softmax))
    assert (tmp_path / "sharp_attention.png").stat().st_size > 0


def test_recall_rows_end_with_the_value_at_the_named_position() -> None:
    from benchmarks.sharp_attention import RECALL_VALUES, recall_split

    split = recall_split(50, 12, seed=3)
    ids, labels = split["input_ids"], split["labels"]
    assert ids.shape == (50, 14) and bool((ids[:, :12] < RECALL_VALUES).all())
    asked = ids[:, 12] - RECALL_VALUES
    assert bool(((asked >= 0) & (asked < 12)).all())
    assert torch.equal(ids[:, -1], ids[torch.arange(50), asked])  # the answer is the value found there
    assert torch.equal(labels[:, -1], ids[:, -1]) and bool((labels[:, :-1] == -100).all())  # scored on it alone
    assert len(set(asked.tolist())) > 6  # every position can be asked


def test_maclaurin_estimators_at_a_tiny_size(tmp_path) -> None:
    assert cli(["bench", "maclaurin_estimators", "--temperatures", "0.5", "2", "--dims", "48", "--seq-len", "32",
                "--head-dim", "16", "--heads", "1", "--seeds", "2", "--output", str(tmp_path)]) == 0
    rows = _json(tmp_path / "maclaurin_estimators.json")["rows"]
    assert len(rows) == 2 * 2 * 5 + 2  # inputs x temperatures x estimators, and the isotropic inputs' floor
    for row in rows:
        assert row["error"] > 0
    floors = [r for r in rows if r["estimator"] == "floor"]
    assert {r["inputs"] for r in floors} == {"isotropic"} and all(r["vs_kar_karnick"] < 1 for r in floors)
    for kind in ("isotropic", "clustered"):  # sharper attention, larger error
        errors = {r["temperature"]: r["error"] for r in rows if (r["inputs"], r["estimator"]) == (kind, "kar-karnick")}
        assert errors[2.0] > errors[0.5]


@pytest.mark.parametrize("law_temperature", [0.5, 2.0])
def test_maclaurin_candidate_estimators_are_unbiased(law_temperature: float) -> None:
    from benchmarks.maclaurin_estimators import PROJECTIONS, SampledDegreeFeatures, tuned_law
    from macformer.kernels import get_kernel

    x = torch.randn(8)
    y = torch.randn(8)
    x, y = x / x.norm(), 0.8 * y / y.norm()
    exact = float(get_kernel("exp").fn(x @ y))
    for projections in PROJECTIONS:
        samples = torch.tensor([float(feature(x) @ feature(y)) for feature in (
            SampledDegreeFeatures(8, 24, "exp", tuned_law("exp", law_temperature), projections, seed)
            for seed in range(3000))])
        error = samples.std() / len(samples) ** 0.5
        assert abs(samples.mean() - exact) < 5 * error, (projections, samples.mean(), exact, error)


def test_complex_projections_lower_the_variance_of_aligned_pairs() -> None:
    # Per factor the second moment is |x|^2|y|^2 + (x.y)^2 (complex) against + 2 (x.y)^2 (real): for
    # x = y and degree 3 that is 8 against 27 per feature, 16 against 27 per pair of output slots.
    from benchmarks.maclaurin_estimators import SampledDegreeFeatures

    x = torch.randn(8, generator=torch.Generator().manual_seed(0))
    x = 1.5 * x / x.norm()
    variances = {}
    for projections in ("rademacher", "complex"):
        samples = torch.tensor([float(feature(x) @ feature(x)) for feature in (
            SampledDegreeFeatures(8, 25, "exp", {3: 1.0}, projections, seed) for seed in range(2000))])
        variances[projections] = float(samples.var())
    assert variances["complex"] < 0.8 * variances["rademacher"], variances
