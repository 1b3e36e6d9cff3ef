"""The committed benchmark results are true of today's code: each names the commit it was measured at, names only
methods the benchmarks still run, and its markdown table is what today's report code renders from its JSON."""

import json
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
RESULTS = BENCH / "results"
JSONS = sorted(RESULTS.glob("*.json"))


@pytest.fixture(scope="module")
def bench_modules():
    """bench/ on sys.path, as its scripts put it (they import each other by name)."""
    sys.path[:0] = [str(BENCH)]
    try:
        import generation
        import harness
        import kernel_cases
        import linear_cross_entropy
        import peer_methods
        import scan_cases
        import trl_sft

        yield {"generation": generation, "harness": harness, "kernel_cases": kernel_cases,
               "linear_cross_entropy": linear_cross_entropy, "peer_methods": peer_methods, "scan_cases": scan_cases,
               "trl_sft": trl_sft}
    finally:
        sys.path.remove(str(BENCH))


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _commits(data) -> set[str]:
    """Every "git_commit" value anywhere in a result (pytest-benchmark's: `commit_info.id`, clean trees only)."""
    if isinstance(data, dict):
        found = {data["git_commit"]} if isinstance(data.get("git_commit"), str) else set()
        info = data.get("commit_info")
        if isinstance(info, dict) and not info.get("dirty", True):
            found.add(info["id"])
        return found.union(*(_commits(v) for v in data.values()))
    if isinstance(data, list):
        return set().union(*(_commits(v) for v in data))
    return set()


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.name)
def test_every_result_names_the_commit_it_was_measured_at(path):
    commits = _commits(json.loads(path.read_text()))
    assert len(commits) == 1 and re.fullmatch(r"[0-9a-f]{7,40}", next(iter(commits))), commits
    markdown = path.with_suffix(".md")
    if markdown.exists():
        assert f"commit {next(iter(commits))}" in markdown.read_text(), f"{markdown.name} names another commit"


@pytest.mark.parametrize("stem, cases, part", [("kernels_cpu", "kernel_cases", "kernels"),
                                               ("scan_cpu", "scan_cases", "scan")])
def test_kernel_and_scan_results_name_todays_providers_and_render_as_committed(bench_modules, stem, cases, part):
    result, module = _load(f"{stem}.json"), bench_modules[cases]
    providers = ({"lookup": module.LOOKUP_PROVIDERS, "backward": module.BACKWARD_PROVIDERS} if part == "kernels"
                 else {row["op"]: module.PROVIDERS for row in result["rows"]})
    for row in result["rows"]:
        assert row["provider"] in providers[row["op"]], f"{row['provider']} is no {row['op']} provider any more"
        if row["provider"].startswith("pema"):  # ours run wherever their kernels can: else it is a stale record
            assert row["status"] == "ok" or "needs a GPU" in row.get("error", ""), (row["case"], row["provider"],
                                                                                    row.get("error"))
    table = bench_modules["harness"].table(result["rows"], result["copy"])
    assert "\n".join(table) in (RESULTS / f"{stem}.md").read_text(), "the table's columns or rows changed"


def test_linear_cross_entropy_results_name_todays_providers_and_render_as_committed(bench_modules):
    module, result = bench_modules["linear_cross_entropy"], _load("linear_cross_entropy_cpu.json")
    assert {row["provider"] for row in result["rows"]} <= set(module.PROVIDERS)
    table = module.table(result["rows"])
    assert "\n".join(table) in (RESULTS / "linear_cross_entropy_cpu.md").read_text()


def test_trl_sft_results_render_as_committed_and_agree_with_their_baseline(bench_modules):
    result = _load("trl_sft_cpu.json")
    assert bench_modules["trl_sft"].render(result) == (RESULTS / "trl_sft_cpu.md").read_text()
    for got, want in zip(result["pema"]["losses"], result["baseline"]["losses"], strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    assert result["pema"]["optimizer_bytes"] < result["baseline"]["optimizer_bytes"]


def test_generation_results_render_as_committed_and_the_trimmed_model_generates_what_the_full_one_can(bench_modules):
    result = _load("generation_cpu.json")
    assert bench_modules["generation"].render(result) == (RESULTS / "generation_cpu.md").read_text()
    for row in result["rows"]:  # the trimmed model's greedy ids = the full model's with its logits masked to K
        assert row["same_prompt_tokens"] and row["constrained_identical"] == len(row["full"]["generated"])


def test_peer_results_name_todays_methods(bench_modules):
    methods = bench_modules["peer_methods"].METHODS
    assert [m["method"] for m in _load("peers.json")["methods"]] == list(methods)
