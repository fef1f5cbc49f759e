"""``dask shm bench``: the statistics helpers, the report generator, and a
smoke run of the real command on tiny payloads.  No timing is asserted
(timings are the benchmark's business, not the suite's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dask_shm.bench import SECTIONS, main
from dask_shm.bench.paired import interleaved, iqr, median, paired_ratio, ratio_of_medians
from dask_shm.bench.results import Case, Run, load, save
from dask_shm.bench.workloads import CONTROL, NO_TRANSFER

DASK = str(Path(sys.executable).parent / "dask")
#: The headings the report gives each section.
TITLES = {
    "workloads": "## Real workloads",
    "mixed": "## Mixed sequence",
    "transfers": "## Transfers",
    "cold": "## Cold",
    "memory": "## Memory",
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
    assert "## Real workloads" in capsys.readouterr().out


def test_report_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"format": 0}))
    with pytest.raises(SystemExit):
        main(["--report", str(bad)])


@pytest.mark.slow
def test_quick_run_covers_every_section_and_its_report_regenerates(tmp_path: Path) -> None:
    run = subprocess.run(
        [DASK, "shm", "bench", "--quick", "--reps", "1", "--workers", "2",
         "--sizes", "1KB,2MB", "--large", "2MB", "--workload-size", "4MB",
         "--cold-delay", "0.5", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=170, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for title in TITLES.values():
        assert title in run.stdout, title
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {c["section"] for c in doc["cases"]} == set(SECTIONS)
    for c in doc["cases"]:
        if c["section"] in ("memory", "joblib") or c["name"] == "memcpy":
            continue
        extra = set()
        if c["section"] == "workloads":
            extra = {CONTROL, NO_TRANSFER} if c["name"].startswith("futures") else {CONTROL}
        assert set(c["samples"]) == {"tcp", "shm"} | extra, c["name"]
        for metrics in c["samples"].values():
            assert all(len(v) == 1 for v in metrics.values()), c  # --reps 1, warm-up apart
    for key in ("cpu model", "kernel", "python", "versions", "shm directory size",
                "thp shmem_enabled"):
        assert key in doc["machine"], key
    written = (tmp_path / "benchmark.md").read_text()
    (tmp_path / "benchmark.md").unlink()
    assert main(["--report", str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "benchmark.md").read_text() == written
