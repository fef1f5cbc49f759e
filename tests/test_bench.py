"""``dask shm bench``: the statistics helpers, the report generator, and a
smoke run of the real command on tiny payloads.  No timing is asserted
(timings are the benchmark's business, not the suite's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dask
import pytest

from dask_shm.bench import SECTIONS, main
from dask_shm.bench.buffer import SKIPPED, run_through_buffer
from dask_shm.bench.paired import interleaved, iqr, median, paired_ratio, ratio_of_medians
from dask_shm.bench.paths import PROCESS, cluster_counters
from dask_shm.bench.report import readme_summary
from dask_shm.bench.results import Case, Run, load, save
from dask_shm.bench.workloads import CONTROL, NO_TRANSFER

DASK = str(Path(sys.executable).parent / "dask")
#: The headings the report gives each section.
TITLES = {
    "workloads": "## Real workloads",
    "buffer": "## Real workloads through the buffer (single-copy: false)",
    "mixed": "## Mixed sequence",
    "transfers": "## Transfers",
    "cold": "## Cold",
    "memory": "## Memory",
    "holders": "## Data held by several workers",
    "joblib": "## joblib",
}


def test_paired_ratio_is_the_median_of_per_pair_ratios() -> None:
    # The ratio of medians would be 4/2 = 2; the pairs say 3.
    assert paired_ratio([3.0, 4.0, 30.0], [1.0, 2.0, 10.0]) == 3.0
    assert ratio_of_medians([3.0, 4.0, 30.0], [1.0, 2.0, 10.0]) == 2.0
    assert paired_ratio([1.0, 2.0], [0.0, 1.0]) == 2.0  # a zero denominator is skipped
    assert paired_ratio([1.0], [0.0]) is None
    assert paired_ratio([1.0, 2.0], [1.0]) is None  # not pairs
    assert median([]) is None and iqr([]) is None and iqr([5.0]) == 0.0
    assert iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == 2.0


def test_interleaving_alternates_which_transport_goes_first() -> None:
    assert [interleaved(["tcp", "shm"], r)[0] for r in range(4)] == ["tcp", "shm", "tcp", "shm"]
    # with the control, each takes each place once in three repetitions
    orders = [interleaved(["tcp", "shm", CONTROL], r) for r in range(3)]
    assert all(sorted(o[i] for o in orders) == sorted(orders[0]) for i in range(3))


def test_case_keeps_the_warmup_apart_and_orients_ratios() -> None:
    c = Case("workloads", "w", 100)
    c.add("tcp", {"wall": 9.0, "cpu": 9.0}, warmup=True)
    for tcp, shm in ((2.0, 1.0), (4.0, 1.0), (3.0, 3.0)):
        c.add("tcp", {"wall": tcp, "cpu": tcp})
        c.add("shm", {"wall": shm, "cpu": shm})
    assert c.values("tcp") == [2.0, 4.0, 3.0] and c.warmup["tcp"]["wall"] == 9.0
    assert c.ratio("tcp", "shm") == 2.0
    c.paired = False
    assert c.ratio("tcp", "shm") == 3.0


def _hand_made_run() -> Run:
    """A run with a case in every section, two repetitions each."""

    def case(section: str, name: str, nbytes: int, transports: dict[str, dict[str, list[float]]],
             paired: bool = True) -> Case:
        return Case(section, name, nbytes, transports, {}, paired)

    both = {"tcp": {"wall": [0.2, 0.3], "cpu": [0.4, 0.6], "cpu_all": [1.0, 1.0], "lo": [4e8, 4e8]},
            "shm": {"wall": [0.1, 0.1], "cpu": [0.2, 0.3], "cpu_all": [0.8, 0.6], "lo": [1e6, 0.0]}}
    cases = [
        case("workloads", "futures", 4 * 10**8,
             {**both, NO_TRANSFER: {"wall": [0.1, 0.1], "cpu": [0.1, 0.1], "lo": [0.0, 0.0]},
              CONTROL: {"wall": [0.25, 0.3], "cpu": [0.4, 0.9], "lo": [4e8, 4e8]}}),
        case("mixed", "worker->worker", 4 * 10**8, both),
        case("mixed", "memcpy", 4 * 10**8, {"memcpy": {"wall": [0.03, 0.03]}}, paired=False),
        case("transfers", "memcpy", 10**6, {"memcpy": {"wall": [1e-4, 1e-4]}}, paired=False),
        case("transfers", "worker->worker", 10**6, both),
        case("transfers", "worker->worker", 10**8, both),
        case("cold", "first worker->worker", 4 * 10**8, both),
        case("memory", "RSS growth", 4 * 10**8,
             {t: {"sender": [0.5, 0.0], "receiver": [1.0, 1.0], "shm directory": [0.0, 0.0]}
              for t in ("tcp", "shm")}, paired=False),
        case("holders", "broadcast scatter", 4 * 10**8,
             {t: {"wall": [0.5, 0.6], "memory": [3.0, 3.0]} for t in ("tcp", "shm", CONTROL)}),
        case("joblib", "result", 4 * 10**8, {t: {"wall": [0.2, 0.3]} for t in
                                              ("loky", "dask tcp", "dask shm")}),
    ]
    return Run({"cpu model": "test CPU", "cpu count": 2}, {"reps": 2, "workers": 3}, cases,
               {"skipped": {"joblib argument": "not in this test"}})


def test_report_regenerates_from_json_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "results.json"
    save(str(path), _hand_made_run())
    assert load(str(path)) == _hand_made_run()
    out = tmp_path / "report"
    assert main(["--report", str(path), "--output", str(out)]) == 0
    md = (out / "benchmark.md").read_text()
    for title in TITLES.values():
        assert title in md, title
    assert "## Method" in md and "test CPU" in md and "not in this test" in md
    # wall tcp/shm 2.50, CPU shm/tcp 0.50 (all 0.70), loopback shm/tcp 0.1%: paired medians,
    # oriented; noise: tcp/tcp again 0.8 and 1.0, CPU tcp again/tcp 1.0 and 1.5
    assert "| futures | 400 MB | 2.50 | 0.50 | 0.70 | 0.1% | 0.90 / 1.25 |" in md
    # its ceiling: tcp/no transfer 2/1 and 3/1, CPU no transfer/tcp 1/4 and 1/6
    assert "| futures | 2.50 | 2.50 | 0.50 | 0.21 | 0.1 | 0.1 |" in md
    assert "![Real workloads](workloads.png)" in md and (out / "workloads.png").stat().st_size
    assert (out / "throughput.png").stat().st_size
    printed = capsys.readouterr().out
    # A summary first (the headline, with the noise), then where the rest is.
    assert printed.startswith("One default run of `dask shm bench`"), printed[:200]
    assert "| futures | 400 MB | 2.50 / 0.50 | 0.90 / 1.25 | - | - |" in printed
    assert "| path, shm:// cluster | - |" in printed and "The full report" in printed


def test_results_without_paths_or_buffer_run_still_render(tmp_path: Path) -> None:
    # a results.json written before the keys existed: "-" where they would be
    doc = json.loads(json.dumps(_as_saved(_hand_made_run())))
    del doc["paths"], doc["buffer_run"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    assert main(["--report", str(path)]) == 0
    md = (tmp_path / "benchmark.md").read_text()
    assert "| path, shm:// cluster | - |" in md
    assert "| path, shm:// cluster of the buffer run | - |" in md
    assert TITLES["buffer"] in md and "Not measured: this results.json has none" in md
    summary = readme_summary(load(str(path)))
    rows = [r for r in summary.splitlines() if r.startswith("| futures |")]
    assert rows and rows[0].split(" | ")[4] == "-", rows  # no buffer run: "-"


def _as_saved(run: Run) -> dict[str, object]:
    from dataclasses import asdict

    return asdict(run)


#: Counters as the shm:// cluster's workers and the benchmark process report them.
SINGLE = {"shm-messages": 5, "single-copy-messages": 5, "below-threshold": 40}
BUFFER = {"shm-messages": 6, "below-threshold": 41}


def _with_buffer_run(buffer_paths: dict[str, dict[str, int]]) -> Run:
    main_run = _hand_made_run()
    main_run.paths = {"tcp": {}, CONTROL: {}, "shm": SINGLE,
                      PROCESS: {"shm-messages": 1, "single-copy-messages": 1,
                                "single-copy-refused-eperm": 2}}
    both = {"tcp": {"wall": [0.3, 0.3], "cpu": [0.6, 0.6], "cpu_all": [1.0, 1.0], "lo": [4e8, 4e8]},
            "shm": {"wall": [0.2, 0.2], "cpu": [0.3, 0.3], "cpu_all": [0.5, 0.5], "lo": [0.0, 0.0]},
            CONTROL: {"wall": [0.3, 0.3], "cpu": [0.6, 0.6], "lo": [4e8, 4e8]}}
    buffered = Case("workloads", "futures", 4 * 10**8, both,
                    extra={"shm counters": {"shm-messages": 6}})
    main_run.buffer_run = Run({"cpu model": "test CPU"}, {"reps": 2, "workers": 3}, [buffered],
                              paths=buffer_paths)
    return main_run


def test_report_shows_the_paths_and_the_buffer_run(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    save(str(path), _with_buffer_run({"tcp": {}, CONTROL: {}, "shm": BUFFER, PROCESS: BUFFER}))
    assert load(str(path)) == _with_buffer_run({"tcp": {}, CONTROL: {}, "shm": BUFFER,
                                                PROCESS: BUFFER})
    assert main(["--report", str(path)]) == 0
    md = (tmp_path / "benchmark.md").read_text()
    # the shm:// cluster's workers plus the benchmark process, refusals by reason
    assert ("| path, shm:// cluster | **single copy**: 6 messages read in place (single copy), "
            "0 through the buffer, 40 below the threshold (over TCP); single copy refused: "
            "eperm 2 |") in md
    assert "| path, tcp:// clusters | `tcp` and `tcp again`: TCP only |" in md
    assert ("| path, shm:// cluster of the buffer run | **buffer**: 0 messages read in place "
            "(single copy), 12 through the buffer, 82 below the threshold") in md
    # both workload tables, the buffer's after the first: wall 0.3/0.2, CPU 0.3/0.6
    first, second = md.index(TITLES["workloads"]), md.index(TITLES["buffer"])
    assert first < second < md.index(TITLES["mixed"])
    assert "| futures | 400 MB | 1.50 | 0.50 | 0.50 | 0.0% | 1.00 / 1.00 |" in md[second:]
    assert "DASK_DASK_SHM__SINGLE_COPY=false" in md  # the method says how it was run
    summary = readme_summary(load(str(path)))
    [row] = [r for r in summary.splitlines() if r.startswith("| futures | 400 MB |")]
    assert row.split(" | ")[4] == "1.50 / 0.50", row  # the buffer run's wall / CPU
    assert "docs/benchmark.md" in summary


def test_report_flags_a_buffer_run_that_read_in_place(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    save(str(path), _with_buffer_run({"shm": SINGLE}))
    assert main(["--report", str(path)]) == 0
    assert "NOT only the buffer: 5 messages were read in place" in (
        tmp_path / "benchmark.md").read_text()


def test_buffer_run_is_skipped_or_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    labels: list[str] = []
    skipped: dict[str, str] = {}
    with dask.config.set({"dask-shm.single-copy": False}):  # the main run was the buffer already
        assert run_through_buffer({}, labels.append, skipped) is None
    assert "already false" in skipped[SKIPPED]
    skipped.clear()
    with dask.config.set({"dask-shm.single-copy": True}):
        # options the child cannot run: its failure becomes a note, the main run survives
        assert run_through_buffer({}, labels.append, skipped) is None
    assert "failed (exit status 1)" in skipped[SKIPPED] and "KeyError" in skipped[SKIPPED]
    assert "Traceback" in capsys.readouterr().err


def test_report_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"format": 0}))
    with pytest.raises(SystemExit):
        main(["--report", str(bad)])


@pytest.mark.slow
def test_quick_run_covers_every_section_and_its_report_regenerates(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DASK_DASK_SHM__SINGLE_COPY"}
    # so that this test's small payloads take shared memory (as conftest's
    # threshold does in-process), and the paths have something to show
    env["DASK_DASK_SHM__THRESHOLD"] = "1 MiB"
    run = subprocess.run(
        [DASK, "shm", "bench", "--quick", "--reps", "1", "--workers", "2",
         "--sizes", "1KB,2MB", "--large", "2MB", "--workload-size", "4MB",
         "--cold-delay", "0.5", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # Printed: the headline (every workload, on both paths), then the paths
    # and where the full report is, which has every section.
    assert "One default run of `dask shm bench`" in run.stdout
    assert "| futures: arrays passed between workers |" in run.stdout
    assert f"The full report (every table, the method): {tmp_path}/benchmark.md" in run.stdout
    written = (tmp_path / "benchmark.md").read_text()
    for title in TITLES.values():
        assert title in written, title
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {c["section"] for c in doc["cases"]} == set(SECTIONS)
    for c in doc["cases"]:
        if c["section"] in ("memory", "joblib") or c["name"] == "memcpy":
            continue
        extra = set()
        if c["section"] == "holders":
            extra = {CONTROL}
        if c["section"] == "workloads":
            extra = {CONTROL, NO_TRANSFER} if c["name"].startswith("futures") else {CONTROL}
        assert set(c["samples"]) == {"tcp", "shm"} | extra, c["name"]
        for metrics in c["samples"].values():
            assert all(len(v) == 1 for v in metrics.values()), c  # --reps 1, warm-up apart
    for key in ("cpu model", "kernel", "python", "versions", "shm directory size",
                "thp shmem_enabled"):
        assert key in doc["machine"], key
    # the paths: the shm:// cluster read in place or says why not; tcp:// saw no shared memory
    assert set(doc["paths"]) == {"tcp", "shm", CONTROL, PROCESS}
    shm = cluster_counters(doc["paths"], "shm")
    refused = sum(v for k, v in shm.items() if k.startswith("single-copy-refused-"))
    assert shm.get("single-copy-messages", 0) > 0 or refused > 0, shm
    assert not any(doc["paths"][t].get("shm-messages") for t in ("tcp", CONTROL))
    # the buffer run: the same workloads, every cluster, and nothing read in place
    buffered = doc["buffer_run"]
    assert [c["name"] for c in buffered["cases"]] == [
        c["name"] for c in doc["cases"] if c["section"] == "workloads"]
    for c in buffered["cases"]:
        assert {"tcp", "shm", CONTROL} <= set(c["samples"]), c["name"]
    shm = cluster_counters(buffered["paths"], "shm")
    assert shm.get("shm-messages", 0) > 0 and shm.get("single-copy-messages", 0) == 0, shm
    assert "| path, shm:// cluster of the buffer run | **buffer**:" in written
    assert "| path, shm:// cluster of the buffer run | **buffer**:" in run.stdout
    (tmp_path / "benchmark.md").unlink()
    assert main(["--report", str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "benchmark.md").read_text() == written
