"""Traces beyond memory: Parquet files checked batch by batch, mergeable statistics, the two-pass report.

Every streamed number is checked against the in-memory computation it replaces: statistics against
``analysis``/``findings`` on the whole trace, pass-2 counts against ``traffic.measure``, the streamed report
against ``experiments.compare``/``drift``/``compare_partitioners``, Dask against one process.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minimoe.cli import main
from minimoe.placement import Topology, group, measure, place
from minimoe.placement.engine import DaskEngine, LocalEngine, run_passes
from minimoe.placement.evaluate import Job, _Tables, count_jobs
from minimoe.placement.experiments import compare, compare_partitioners, drift, masks
from minimoe.placement.fitdata import EXACT_FIT_PAIRS, FIT_PAIRS, auto_fit_tokens
from minimoe.placement.report import DRIFT_EVAL, DRIFT_FIT, run_report
from minimoe.placement.streaming import StreamedExperiments
from minimoe.traces import Trace, synthetic_trace
from minimoe.traces.analysis import coactivation
from minimoe.traces.batches import batches_of
from minimoe.traces.findings import findings, findings_of_stats, request_loads, uniform_imbalance
from minimoe.traces.parquet import ParquetTrace, load_trace
from minimoe.traces.parquet_writer import ParquetTraceWriter, write_parquet
from minimoe.traces.stats import TraceStats, token_classes, trace_stats
from minimoe.traces.synthetic import synthetic_chunks

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "benchmarks" / "results" / "ep_bundled_trace.npz"  # 128 requests of the bundled model


def small_trace(seed=0, **options) -> Trace:
    defaults = dict(num_requests=24, tokens_per_request=20, num_layers=2, num_experts=16, top_k=3, seed=seed)
    trace = synthetic_trace(**{**defaults, **options})
    experts = trace.experts.copy()
    experts[::11, 0, -1] = -1  # some "no expert" slots
    return Trace(experts=experts, request=trace.request, phase=trace.phase, domain=trace.domain,
                 num_experts=trace.num_experts, top_k=trace.top_k, model="small",
                 weights=np.full(experts.shape, 0.5, np.float16))


# ---- the Parquet format --------------------------------------------------------------------------------------------
def test_parquet_round_trip_keeps_every_array(tmp_path):
    trace = small_trace()
    write_parquet(trace, tmp_path / "t.parquet", rows_per_group=100)
    file = ParquetTrace(tmp_path / "t.parquet")
    assert (file.num_tokens, file.num_row_groups, file.column_max("step")) == (480, 5, 9)
    assert load_trace(tmp_path / "t.parquet") == trace
    unlabelled = Trace(experts=trace.experts, request=trace.request, phase=trace.phase, domain=None,
                       num_experts=16, top_k=3)
    write_parquet(unlabelled, tmp_path / "u.parquet")
    assert load_trace(tmp_path / "u.parquet") == unlabelled


def test_import_converts_npz_to_parquet_and_back(tmp_path, capsys):
    trace = small_trace()
    trace.save(tmp_path / "t.npz")
    assert main(["import", str(tmp_path / "t.npz"), "--out", str(tmp_path / "t.parquet")]) == 0
    assert main(["import", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "back.npz")]) == 0
    assert load_trace(tmp_path / "t.parquet") == trace == Trace.load(tmp_path / "back.npz")
    assert "480 tokens, 24 requests" in capsys.readouterr().out


def test_writer_appends_whole_requests_chunk_by_chunk(tmp_path):
    chunks = list(synthetic_chunks(5000, num_layers=2, num_experts=16, top_k=4, prefill_tokens=(30, 60),
                                   decode_tokens=(5, 20), chunk_tokens=900, seed=3))
    with ParquetTraceWriter(tmp_path / "s.parquet", 16, 4, 2, "synthetic", rows_per_group=700) as writer:
        for chunk in chunks:
            writer.append(chunk)
    assert load_trace(tmp_path / "s.parquet") == concat_requests(chunks)


def concat_requests(chunks):
    from minimoe.traces import concat

    return concat(chunks)


def corrupt(tmp_path, name, change, rows_per_group=100):
    """Write small_trace() with one column changed (a function of the pyarrow table), like a foreign writer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_parquet(small_trace(), tmp_path / "ok.parquet", rows_per_group)
    table = pq.read_table(tmp_path / "ok.parquet")
    column = table.column(name).combine_chunks()
    values = change(column)
    index = table.schema.get_field_index(name)
    table = table.set_column(index, table.schema.field(name), pa.array(values, column.type))
    pq.write_table(table, tmp_path / "bad.parquet", row_group_size=rows_per_group)
    return tmp_path / "bad.parquet"


def _shift(start, by):
    def change(column):
        values = np.array(column.to_pylist())
        values[start:] += by
        return values.tolist()
    return change


def _set(index, value):
    def change(column):
        values = column.to_pylist()
        values[index] = value
        return values
    return change


@pytest.mark.parametrize("name, change, message", [
    ("experts_1", _set(250, [3, 99, 4]), "row 250: expert ids must be in [-1, num_experts-1=15]"),
    ("experts_0", _set(7, [5, 5, 1]), "row 7: an expert id repeats in MoE layer 0"),
    ("phase", _set(130, 4), "row 130: phase must be -1, 0 or 1, got 4"),
    ("request", _set(310, 17), "row 310: request ids must grow by 0 or 1"),
    ("request", _shift(300, 1), "row 300: request 16 starts after request 14"),  # where two row groups meet
    ("domain", _set(45, "elsewhere"), "row 45: domain must be constant within a request"),
    ("position", _set(333, 2), "row 333: position 2 of request 16 should be 13"),
    ("step", _set(18, 7), "row 18: decode step 7 of request 0 should be 8"),
])
def test_every_check_of_trace_load_applies_batch_by_batch_naming_file_and_row(tmp_path, name, change, message):
    path = corrupt(tmp_path, name, change)
    with pytest.raises(ValueError) as error:
        run_passes(ParquetTrace(path), LocalEngine(), 2, 16, 0)
    assert str(path) in str(error.value) and message in str(error.value)


def test_a_parquet_trace_is_recognised_by_its_magic_bytes_whatever_its_suffix(tmp_path):
    trace = small_trace()
    write_parquet(trace, tmp_path / "t.parquet")
    (tmp_path / "t.parquet").rename(tmp_path / "t.pq")
    assert load_trace(tmp_path / "t.pq") == trace
    assert main(["findings", "--trace", str(tmp_path / "t.pq")]) == 0


def test_a_domain_that_changes_inside_a_request_is_named_as_plain_text():
    trace = small_trace()
    domain = trace.domain.astype("<U16")  # room for the longer label
    domain[5] = "elsewhere"  # request 0 holds tokens 0..19
    with pytest.raises(ValueError) as error:
        Trace(experts=trace.experts, request=trace.request, phase=trace.phase, domain=domain, num_experts=16, top_k=3)
    assert f"request 0 has '{trace.domain[0]}' and 'elsewhere'" in str(error.value) and "np." not in str(error.value)


def test_a_layer_without_any_expert_id_is_refused_naming_the_file(tmp_path, capsys):
    """As for .npz traces: a layer of -1 only (a dense layer, or one the capture never wrote) has no load."""
    trace = small_trace()
    experts = trace.experts.copy()
    experts[:, 1] = -1
    path = tmp_path / "dense.parquet"
    write_parquet(Trace(experts=experts, request=trace.request, phase=trace.phase, domain=trace.domain,
                        num_experts=16, top_k=3), path)
    with pytest.raises(ValueError, match=r"dense.parquet'?: MoE layer 1 holds no expert id \(all -1\)"):
        run_passes(ParquetTrace(path), LocalEngine(), 2, 16, 0)
    for argv in (["report", "--trace", str(path), "--out", str(tmp_path / "out")], ["findings", "--trace", str(path)]):
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert "dense.parquet" in err and "MoE layer 1 holds no expert id" in err and "Traceback" not in err


def test_negative_weights_are_refused_naming_file_and_row(tmp_path):
    """The passes read expert ids only; reading the weights checks them as Trace.load does."""
    path = corrupt(tmp_path, "weights_1", _set(222, [0.5, -0.25, 0.5]))
    with pytest.raises(ValueError) as error:
        ParquetTrace(path).read()
    assert str(path) in str(error.value) and "row 222: weights must be >= 0" in str(error.value)


def test_files_that_are_not_minimoe_traces_are_refused_by_name(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="plain.parquet.*no minimoe metadata"):
        ParquetTrace(tmp_path / "plain.parquet")
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="text.parquet.*not a readable Parquet file"):
        ParquetTrace(tmp_path / "text.parquet")
    with pytest.raises(FileNotFoundError):
        ParquetTrace(tmp_path / "missing.parquet")


def test_a_damaged_page_is_named_by_file_and_row_group(tmp_path, capsys):
    """A byte-damaged page inside the file (the footer intact) fails every reader with the file and row group."""
    import pyarrow.parquet as pq

    from minimoe.placement.splits import choose_split

    path = tmp_path / "damaged.parquet"
    write_parquet(small_trace(seed=2), path, rows_per_group=64)
    metadata = pq.ParquetFile(path).metadata
    columns = [metadata.row_group(1).column(j) for j in range(metadata.num_columns)]
    offset = next(c.data_page_offset for c in columns if c.path_in_schema == "request")
    data = bytearray(path.read_bytes())
    data[offset:offset + 16] = b"\xff" * 16  # the page header of row group 1's request column
    path.write_bytes(bytes(data))
    expected = f"trace file {str(path)!r}: row group 1 (rows from 64) is not readable"
    with pytest.raises(ValueError) as error:
        run_passes(ParquetTrace(path), LocalEngine(), 2, 16, 0)
    assert expected in str(error.value)
    with pytest.raises(ValueError) as error:
        choose_split(ParquetTrace(path))
    assert expected in str(error.value)
    assert main(["report", "--trace", str(path), "--topologies", "2x2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("minimoe report: error: " + expected), err


# ---- pass 1: statistics ----------------------------------------------------------------------------------------------
def test_streamed_statistics_equal_the_in_memory_ones_exactly(tmp_path):
    trace = small_trace(seed=4)
    write_parquet(trace, tmp_path / "t.parquet", rows_per_group=64)
    streamed = run_passes(ParquetTrace(tmp_path / "t.parquet"), LocalEngine(), 3, 40, seed=7)
    in_memory = trace_stats(trace, 3, sample_size=40, seed=7, batch_tokens=1000)
    np.testing.assert_array_equal(streamed.counts, in_memory.counts)
    np.testing.assert_array_equal(streamed.tokens, in_memory.tokens)
    np.testing.assert_array_equal(streamed.domain, in_memory.domain)
    np.testing.assert_array_equal(streamed.coactivation, in_memory.coactivation)
    for name, sample in in_memory.samples.items():
        for field in ("hash", "row", "request", "token_class", "experts"):
            np.testing.assert_array_equal(getattr(streamed.samples[name], field), getattr(sample, field))
    # and they are the statistics of the trace itself
    np.testing.assert_array_equal(streamed.request_loads(), request_loads(trace))
    np.testing.assert_array_equal(streamed.coactivation.sum(0), coactivation(trace))
    classes = token_classes(trace.phase, masks_step(trace), 3)
    assert streamed.tokens.sum(0).tolist() == np.bincount(classes, minlength=4).tolist()
    assert findings_of_stats(streamed) == findings(trace)


def masks_step(trace):
    from minimoe.traces.batches import positions_and_steps

    return positions_and_steps(trace.request, trace.phase)[1]


def test_statistics_merge_in_any_order_and_split_into_one_result():
    trace = small_trace(seed=5)
    whole = trace_stats(trace, 2, sample_size=32)
    parts = []
    for batch in batches_of(trace, 37):  # requests straddle the batches
        part = TraceStats.empty(16, 3, 2, "small", 2, 32, 0, True)
        parts.append(part.add(batch))
    merged = parts[-1]
    for part in reversed(parts[:-1]):
        merged = part.merge(merged) if len(part.blocks) % 2 else merged.merge(part)
    merged.finish()
    np.testing.assert_array_equal(merged.counts, whole.counts)
    np.testing.assert_array_equal(merged.samples["all"].row, whole.samples["all"].row)
    assert len(whole.samples["all"].row) == 32 and np.all(np.diff(whole.samples["all"].hash.astype(float)) > 0)


def test_the_bottom_k_sample_is_uniform():
    trace = small_trace(seed=6, num_requests=60)
    hits = np.zeros(trace.num_tokens)
    for seed in range(300):
        hits[trace_stats(trace, sample_size=120, seed=seed).samples["all"].row] += 1
    expected = 300 * 120 / trace.num_tokens  # every token equally likely: 30 times
    assert abs(hits.mean() - expected) < 1e-9 and hits.std() < 0.3 * expected


def test_uniform_routing_baseline_matches_brute_force_draws():
    rng = np.random.default_rng(0)
    brute = []
    for _ in range(3000):
        chosen = np.argsort(rng.random((150, 12)), axis=1)[:, :3]
        loads = np.bincount(chosen.ravel(), minlength=12)
        brute.append(loads.max() / loads.mean())
    exact = uniform_imbalance(150, 12, 3, draws=3000, seed=1)["max_over_mean"]
    standard_error = np.std(brute) / np.sqrt(3000)
    assert abs(np.mean(exact) - np.mean(brute)) < 4 * standard_error * np.sqrt(2)
    assert abs(np.percentile(exact, 95) - np.percentile(brute, 95)) < 0.03


# ---- pass 2: counts --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["2x2", "4x2", "1x4", "2x1"])
def test_pass_two_counts_equal_measure(shape):
    trace, topology = small_trace(seed=8), Topology.parse(shape)
    token_sets = masks(trace, 3)
    sources = group(trace, topology, "random", seed=1)
    for spare in (0, 1, 2):
        for method in ("contiguous", "eplb", "locality"):
            placement = place(trace, topology, method, tokens=token_sets["prefill"], sources=sources if
                              method == "locality" else None, num_replicas=16 + spare * topology.num_gpus)
            expected = measure(trace, placement, topology, sources=sources, tokens=token_sets["eval"])
            job, table = Job(placement, sources), _Tables(placement)
            counts = None
            for batch in batches_of(trace, 53):
                part = count_jobs(batch, token_classes(batch.phase, batch.step, 3), [job], [table], chunk=17)[0]
                counts = part if counts is None else counts + part
            for name, value in counts.summary().items():
                assert value == getattr(expected, name), (method, spare, name)


# ---- the report: streamed == in memory, and engines agree ----------------------------------------------------------
def test_streamed_experiments_equal_the_in_memory_ones_when_nothing_is_sampled():
    trace = Trace.load(BUNDLED)
    stats = trace_stats(trace, 8, sample_size=None)
    experiments = StreamedExperiments(stats)
    topology = Topology(4, 2)
    experiments.compare(topology, 40)
    experiments.compare_partitioners(topology, 32, ("fm",))
    experiments.drift(topology, DRIFT_FIT, DRIFT_EVAL)
    jobs, index = experiments.unique_jobs()
    counts = LocalEngine().pass_two(trace, 8, jobs)
    result = experiments.results([counts[i] for i in index])
    assert result["rows"] == compare(trace, topology, 40, window=8)
    assert result["drift"] == drift(trace, topology, DRIFT_FIT, DRIFT_EVAL)
    strip = lambda rows: [{k: v for k, v in row.items() if k != "fit_seconds"} for row in rows]  # noqa: E731
    assert strip(result["partitioners"]) == strip(compare_partitioners(trace, topology, 32, ("fm",), window=8))


def test_report_on_parquet_equals_report_on_npz(tmp_path):
    trace = Trace.load(BUNDLED)
    write_parquet(trace, tmp_path / "t.parquet", rows_per_group=3000)
    options = dict(topologies=[Topology(2, 2)], max_fit_tokens=2000)
    from_file = run_report(ParquetTrace(tmp_path / "t.parquet"), **options)
    in_memory = run_report(trace, **options)
    assert from_file["rows"] == in_memory["rows"] and from_file["findings"] == in_memory["findings"]
    assert from_file["drift"] == in_memory["drift"]


def test_dask_local_cluster_with_two_workers_equals_one_process(tmp_path):
    pytest.importorskip("dask.distributed", reason="the dask extra: pip install 'minimoe[dask]'")
    trace = small_trace(seed=9, num_requests=40)
    write_parquet(trace, tmp_path / "t.parquet", rows_per_group=97)  # 9 row groups: requests straddle them
    file = ParquetTrace(tmp_path / "t.parquet")
    local = run_passes(file, LocalEngine(), 3, 50)
    engine = DaskEngine(workers=2)
    try:
        assert len(engine.client.scheduler_info()["workers"]) == 2
        distributed = run_passes(file, engine, 3, 50)
        experiments = StreamedExperiments(local)
        experiments.compare(Topology(2, 2), 16, fit_modes=("prefill",))
        jobs, _ = experiments.unique_jobs()
        counts = engine.pass_two(file, 3, jobs)
    finally:
        engine.close()
    np.testing.assert_array_equal(distributed.counts, local.counts)
    np.testing.assert_array_equal(distributed.coactivation, local.coactivation)
    for name in local.samples:
        np.testing.assert_array_equal(distributed.samples[name].row, local.samples[name].row)
    expected = LocalEngine().pass_two(file, 3, jobs)
    assert [c.summary() for c in counts] == [c.summary() for c in expected]


def test_a_bad_row_read_by_a_dask_worker_fails_in_one_line(tmp_path, capsys):
    pytest.importorskip("dask.distributed", reason="the dask extra: pip install 'minimoe[dask]'")
    path = corrupt(tmp_path, "phase", _set(130, 4))
    status = main(["report", "--trace", str(path), "--workers", "2", "--topologies", "2x2",
                   "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.splitlines()  # progress lines, then the error
    assert status == 2 and "row 130: phase must be -1, 0 or 1" in err[-1] and "Traceback" not in "".join(err)


# ---- sampling: the fit of the bundled trace with a quarter of its prefill tokens --------------------------------
def test_a_sampled_fit_stays_within_two_points_of_the_full_fit_on_the_bundled_trace():
    """Fitting sets sampled to 3,000 tokens (a quarter of the 11,976 prefill tokens, nearly all of the 3,072
    held-out ones) move every saving by at most 2 points (measured: 1.6) and their mean by at most 0.5 points
    (measured: 0.1); the findings do not depend on the sample."""
    trace = Trace.load(BUNDLED)
    topologies = [Topology(2, 2), Topology(4, 2)]
    full = run_report(trace, topologies, max_fit_tokens=None)
    sampled = run_report(trace, topologies, max_fit_tokens=3000)
    assert sampled["findings"] == full["findings"]
    gaps = [abs(a["cut_vs_contiguous"] - b["cut_vs_contiguous"]) for a, b in zip(sampled["rows"], full["rows"])]
    assert max(gaps) <= 0.02 and np.mean(gaps) <= 0.005, (max(gaps), np.mean(gaps))


def test_auto_fits_every_token_of_a_small_trace_and_samples_a_large_one():
    assert auto_fit_tokens(EXACT_FIT_PAIRS // 2, 2) is None  # the bundled trace's size: an exact fit
    assert auto_fit_tokens(EXACT_FIT_PAIRS // 8 + 1, 8) == FIT_PAIRS // 8  # one pair more: 8,192 sampled tokens
    assert auto_fit_tokens(10 ** 8, 2) == FIT_PAIRS // 2
    small = Trace.load(BUNDLED)
    assert run_report(small, [Topology(2, 2)])["max_fit_tokens"] is None  # "auto" is the default


# ---- the command line ------------------------------------------------------------------------------------------------
def test_report_reads_a_parquet_trace_and_says_what_the_fit_sampled(tmp_path, capsys):
    write_parquet(Trace.load(BUNDLED), tmp_path / "t.parquet")
    status = main(["report", "--trace", str(tmp_path / "t.parquet"), "--topologies", "2x2", "--max-fit-tokens",
                   "4000", "--out", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "uniform sample of at most 4,000 tokens per fitting set" in out and "pass 2 (in-process)" in err
    assert "Locality placement by node partitioner: not run (minimoe report --compare-partitioners" in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["max_fit_tokens"] == 4000 and len(report["rows"]) == 36


@pytest.mark.parametrize("argv, expected", [
    (["--max-fit-tokens", "0"], "argument --max-fit-tokens: expected a whole number >= 1, 'all' or 'auto', got '0'"),
    (["--workers", "2"], "--workers: Dask workers read the trace from a Parquet file"),
    (["--scheduler", "tcp://x:1", "--trace", "t.npz"], "--scheduler: Dask workers read the trace from a Parquet file"),
    (["--workers", "2", "--scheduler", "tcp://x:1"], "not allowed with argument"),
    (["--workers", "100000"], "argument --workers: expected at most"),
    (["--scheduler", ""], "argument --scheduler: expected a Dask scheduler address such as tcp://10.0.0.1:8786"),
    (["--scheduler", "http://127.0.0.1:8786"], "argument --scheduler: expected a Dask scheduler address"),
    (["--scheduler", "notanaddress"], "argument --scheduler: expected a Dask scheduler address"),
])
def test_bad_engine_and_sampling_flags_fail_in_one_line(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small_trace().save(tmp_path / "t.npz")
    try:
        status = main(["report", *argv])
    except SystemExit as stop:
        status = stop.code
    err = capsys.readouterr().err
    assert status == 2 and expected in err and err.count("\n") == 1, err


def test_a_refused_scheduler_address_fails_at_once_in_one_line(tmp_path, monkeypatch):
    pytest.importorskip("dask.distributed", reason="the dask extra: pip install 'minimoe[dask]'")
    from minimoe.placement import engine

    import time

    monkeypatch.setattr(engine, "CONNECT_TIMEOUT_S", 30)
    start = time.perf_counter()
    with pytest.raises(OSError, match="--scheduler tcp://127.0.0.1:9: no Dask scheduler answered there "
                                      r"\(connection refused: nothing listens on that port\)"):
        DaskEngine(scheduler="tcp://127.0.0.1:9")
    assert time.perf_counter() - start < 5  # refused at once, not after the 30 s timeout


def test_a_port_that_accepts_but_never_answers_fails_within_the_timeout(monkeypatch):
    """A wrong port (the dashboard's, say) may accept the connection and never complete Dask's handshake."""
    pytest.importorskip("dask.distributed", reason="the dask extra: pip install 'minimoe[dask]'")
    import socket

    from minimoe.placement import engine

    monkeypatch.setattr(engine, "CONNECT_TIMEOUT_S", 2)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(OSError, match=f"--scheduler {address}: no Dask scheduler answered there within 2 s"):
            DaskEngine(scheduler=address)


def test_a_service_that_is_not_dask_is_named_as_such(monkeypatch):
    """An HTTP server on the port: Dask reads its bytes as a message length and runs out of memory; the error says
    what answered instead of showing that MemoryError."""
    pytest.importorskip("dask.distributed", reason="the dask extra: pip install 'minimoe[dask]'")
    import gc
    import socket
    import threading

    from minimoe.placement import engine

    monkeypatch.setattr(engine, "CONNECT_TIMEOUT_S", 2)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def answer():  # every connection gets an HTTP reply, as a web service would send
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:
                    return
                with connection:
                    connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" * 4)

        threading.Thread(target=answer, daemon=True).start()
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        from distributed import Client

        def clients():
            return sum(isinstance(o, Client) for o in gc.get_objects())

        before = clients()
        with pytest.raises(OSError) as raised:
            DaskEngine(scheduler=address)
        assert clients() <= before  # the half-built client is gone now (not collected later inside other work)
    message = str(raised.value)
    assert message.startswith(f"--scheduler {address}: no Dask scheduler answered there within 2 s")
    assert "MemoryError" not in message and "\n" not in message


def test_a_scheduler_without_workers_fails_in_one_line(monkeypatch):
    pytest.importorskip("dask.distributed", reason="the dask extra: pip install 'minimoe[dask]'")
    from dask.distributed import LocalCluster

    from minimoe.placement import engine

    monkeypatch.setattr(engine, "CONNECT_TIMEOUT_S", 2)
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        with pytest.raises(OSError, match="the scheduler has no workers .none joined within 2 s.; start one with"):
            DaskEngine(scheduler=cluster.scheduler_address)


def test_an_empty_parquet_trace_is_named_in_one_line(tmp_path, capsys):
    with ParquetTraceWriter(tmp_path / "empty.parquet", num_experts=8, top_k=2, num_layers=2):
        pass
    status = main(["report", "--trace", str(tmp_path / "empty.parquet"), "--topologies", "2x2", "--out",
                   str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert status == 2 and "empty.parquet: the trace is empty (no tokens)" in err and err.count("\n") == 1, err


def test_a_pass_whose_workers_are_all_gone_fails_instead_of_waiting(tmp_path, monkeypatch):
    """Dask waits for new workers forever; a pass stops with one line once none has been there for a while."""
    pytest.importorskip("dask.distributed", reason="the dask extra: pip install 'minimoe[dask]'")
    import time

    from dask.distributed import LocalCluster

    from minimoe.placement import engine as engines

    monkeypatch.setattr(engines, "NO_WORKERS_S", 1)
    monkeypatch.setattr(engines, "POLL_S", 0.2)
    write_parquet(small_trace(), tmp_path / "t.parquet", rows_per_group=97)
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        engine = DaskEngine(scheduler=cluster.scheduler_address)
        try:
            cluster.scale(0)
            deadline = time.monotonic() + 30
            while engine.client.nthreads() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not engine.client.nthreads()
            started = time.monotonic()
            with pytest.raises(OSError, match=r"no worker has been connected for 1 s while \d+ tasks wait"):
                run_passes(ParquetTrace(tmp_path / "t.parquet"), engine, 3, 50)
            assert time.monotonic() - started < 20
        finally:
            engine.close()


def test_groupings_do_not_depend_on_the_blas_kernel(tmp_path):
    """The signature grouping once used a BLAS matmul whose kernel (picked by CPU) changed near-tied
    assignments between machines; run it under two OpenBLAS kernels and compare."""
    script = ("import numpy as np; from minimoe.traces import Trace; from minimoe.placement import Topology, group;"
              f"t = Trace.load({str(BUNDLED)!r}); print(group(t, Topology(4, 4), 'signature').tolist())")
    outputs = []
    for core in ("Haswell", "Prescott"):
        env = dict(os.environ, OPENBLAS_CORETYPE=core, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("case", ["phases unknown", "no decode", "short requests"])
def test_the_split_of_a_parquet_file_is_the_split_of_the_trace(case, tmp_path):
    """Traces without both phases fall back to the time or the request split (minimoe.placement.splits); read from
    Parquet, the streamed report picks the same split, from one read of three columns, and measures the same."""
    from minimoe.placement.splits import choose_split
    from minimoe.placement.splits import split

    trace = small_trace(seed=11)
    if case == "phases unknown":
        trace = Trace(experts=trace.experts, request=trace.request, phase=np.full(trace.num_tokens, -1, np.int8),
                      domain=trace.domain, num_experts=16, top_k=3)
    elif case == "no decode":
        trace = Trace(experts=trace.experts, request=trace.request, phase=np.zeros(trace.num_tokens, np.int8),
                      domain=trace.domain, num_experts=16, top_k=3)
    else:  # two tokens per request: nothing after the first half and a window
        rows = np.flatnonzero(np.tile(np.arange(20) < 2, 24))
        trace = Trace(experts=trace.experts[rows], request=trace.request[rows],
                      phase=np.full(len(rows), -1, np.int8), domain=trace.domain[rows], num_experts=16, top_k=3)
    write_parquet(trace, tmp_path / "t.parquet", rows_per_group=70)
    file = ParquetTrace(tmp_path / "t.parquet")
    expected, streamed = split(trace), choose_split(file)
    assert (streamed.kind, streamed.window, streamed.description) == (expected.kind, expected.window,
                                                                      expected.description)
    assert streamed.kind == {"phases unknown": "time", "no decode": "time", "short requests": "request"}[case]
    for name in ("prefill", "online", "eval"):  # the rule classes tokens as the split's masks do
        if expected.masks[name] is None:
            continue
        classes = np.concatenate([streamed.rule.classes(batch) for batch in file.batches()])
        np.testing.assert_array_equal(classes == {"prefill": 0, "online": 1, "eval": 2}[name], expected.masks[name])
    options = dict(topologies=[Topology(2, 2)], max_fit_tokens=None)
    from_file, in_memory = run_report(file, **options), run_report(trace, **options)
    assert from_file["rows"] == in_memory["rows"] and from_file["split"] == in_memory["split"]
    assert from_file["findings"] == in_memory["findings"] and from_file["decision"] == in_memory["decision"]


def test_report_on_a_parquet_trace_writes_the_recommended_placements(tmp_path, capsys):
    write_parquet(small_trace(seed=12), tmp_path / "t.parquet")
    status = main(["report", "--trace", str(tmp_path / "t.parquet"), "--topologies", "2x2", "--out",
                   str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert status == 0, err
    saved = sorted(p.name for p in (tmp_path / "r").iterdir() if p.name not in ("report.txt", "report.json",
                                                                                    "report.html"))
    assert saved and all(name.endswith(".json") for name in saved)
    from minimoe.placement import Placement

    for name in saved:
        Placement.load(tmp_path / "r" / name)  # each file holds a valid placement
