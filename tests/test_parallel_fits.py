"""Fits in worker processes give the placements one process gives, in the same order."""
import json

import numpy as np
import pytest

from minimoe.cli import main
from minimoe.placement import Topology
from minimoe.placement.parallel_fits import AUTO_MIN_PAIRS, auto_processes, fit_many
from minimoe.placement.report import run_report
from minimoe.traces import synthetic_trace

TOPOLOGIES = [Topology(2, 2), Topology(2, 4)]


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(num_requests=32, tokens_per_request=24, num_layers=2, num_experts=16, top_k=2, seed=3)


def test_the_report_fitted_in_two_processes_equals_the_report_fitted_in_one(trace):
    fitted_one, fitted_two = {}, {}
    one = run_report(trace, TOPOLOGIES, fitted=fitted_one, fit_processes=1)
    two = run_report(trace, TOPOLOGIES, fitted=fitted_two, fit_processes=2)
    assert one["rows"] and json.dumps(one["rows"], sort_keys=True) == json.dumps(two["rows"], sort_keys=True)
    assert fitted_one.keys() == fitted_two.keys()
    for key, (placement, sources) in fitted_one.items():
        assert np.array_equal(placement, fitted_two[key][0]) and np.array_equal(sources, fitted_two[key][1])


def test_auto_uses_the_cores_only_for_large_fitting_sets():
    assert auto_processes(AUTO_MIN_PAIRS - 1, cores=8) == 1
    assert auto_processes(AUTO_MIN_PAIRS, cores=2) == 2 and auto_processes(AUTO_MIN_PAIRS, cores=16) == 4
    assert auto_processes(10**6, cores=1) == 1


def test_bad_process_counts_are_refused(trace, capsys):
    with pytest.raises(ValueError, match="processes must be an int >= 1, got 0"):
        fit_many({}, [], 0, 0)
    with pytest.raises(SystemExit) as stop:
        main(["report", "--trace", "unused.npz", "--fit-processes", "two"])
    assert stop.value.code == 2 and "expected a whole number >= 1 or 'auto', got 'two'" in capsys.readouterr().err
