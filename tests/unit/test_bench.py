"""The bench's cost figures: CPU per event against decode per event, and the rates' ratios."""

import os

import pytest

from pipeline.app.bench import cost_of, cpu_seconds


def test_cost_figures_of_a_run():
    # 100,000 events drained in 4 s (25,000/s) on 3 CPU seconds; decode alone at 50,000/s on 2 CPU seconds, the
    # worker's own decode step on 0.8.
    cost = cost_of(100_000, e2e_events_per_s=25_000.0, decode_events_per_s=50_000.0,
                   publish_events_per_s=40_000.0, worker_cpu_s=3.0, decode_cpu_s=2.0, pipeline_decode_cpu_s=0.8)
    assert cost.worker_cpu_us_per_event == pytest.approx(30.0)
    assert cost.decode_us_per_event == pytest.approx(20.0)
    assert cost.pipeline_decode_us_per_event == pytest.approx(8.0)
    assert cost.cpu_over_decode == pytest.approx(1.5)
    assert cost.e2e_over_decode == pytest.approx(0.5)
    assert cost.e2e_over_publish == pytest.approx(0.625)


def test_a_worker_as_cheap_as_decoding_meets_the_goals():
    cost = cost_of(1_000, e2e_events_per_s=10_000.0, decode_events_per_s=10_000.0, publish_events_per_s=10_000.0,
                   worker_cpu_s=0.1, decode_cpu_s=0.1, pipeline_decode_cpu_s=0.05)
    assert cost.cpu_over_decode == pytest.approx(1.0)
    assert cost.e2e_over_decode == pytest.approx(1.0)


def test_cpu_seconds_from_a_stat_line_whose_command_has_spaces_and_parentheses():
    # Fields after the command: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    line = "4242 (python3 (w) x) S 1 4242 4242 0 -1 4194304 900 0 3 0 250 70 5 1 20 0 4 0"
    assert cpu_seconds(line, 100) == pytest.approx(3.2)


def test_cpu_seconds_of_this_process_grow_with_work():
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/self/stat") as stat:
        before = cpu_seconds(stat.read(), ticks)
    sum(i * i for i in range(3_000_000))
    with open("/proc/self/stat") as stat:
        after = cpu_seconds(stat.read(), ticks)
    assert after - before > 0.05


def _busy_in_a_thread() -> int:
    return sum(i * i for i in range(200_000))


def _busy_in_the_main_thread() -> int:
    return sum(i * i for i in range(200_000))


def test_the_worker_profile_holds_every_thread(tmp_path):
    import pstats
    import threading

    from pipeline.adapters.worker import _profiled

    path = tmp_path / "worker.pstats"
    with _profiled(str(path)):
        thread = threading.Thread(target=_busy_in_a_thread)
        thread.start()
        _busy_in_the_main_thread()
        thread.join()
    functions = {name for _file, _line, name in pstats.Stats(str(path)).stats}
    assert {"_busy_in_a_thread", "_busy_in_the_main_thread"} <= functions


def test_no_profile_without_a_path(tmp_path):
    from pipeline.adapters.worker import _profiled

    with _profiled(""):
        pass
    assert list(tmp_path.iterdir()) == []
