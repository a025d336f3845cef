"""Trace type and file format: round trips, selection, and hostile files rejected with ValueError."""

import io
import pickle
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minimoe.traces import Trace, concat, synthetic_trace
from minimoe.traces.synthetic import planted_trace

FUZZ = settings(max_examples=25, deadline=None)


def random_trace(seed=0, num_requests=5, num_layers=3, num_experts=8, top_k=2, weights=True, domains=True):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, num_requests)
    n = int(lengths.sum())
    keys = rng.random((n, num_layers, num_experts))
    experts = np.argsort(keys, axis=2)[..., :top_k]  # distinct ids per (token, layer)
    experts[rng.random((n, num_layers, top_k)) < 0.05] = -1
    labels = np.array(["code", "math", "chat", "general"])
    return Trace(experts=experts, request=np.repeat(np.arange(num_requests), lengths),
                 phase=rng.integers(-1, 2, n), num_experts=num_experts, top_k=top_k, model="tiny-moe",
                 domain=np.repeat(labels[rng.integers(0, 4, num_requests)], lengths) if domains else None,
                 weights=rng.random((n, num_layers, top_k)) if weights else None)


def to_bytes(trace):
    buffer = io.BytesIO()
    trace.save(buffer)
    return buffer.getvalue()


def trace_arrays(trace):
    return dict(np.load(io.BytesIO(to_bytes(trace)), allow_pickle=False))


def write_npz(arrays):
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # may pickle object arrays: that is what we test against
    return buffer.getvalue()


def load_bytes(data):
    return Trace.load(io.BytesIO(data))


# ---- round trips -----------------------------------------------------------------------------------------------
@FUZZ
@given(seed=st.integers(0, 10**6), requests=st.integers(0, 6), layers=st.integers(1, 4),
       experts=st.integers(1, 40), weights=st.booleans(), domains=st.booleans(), data=st.data())
def test_save_load_round_trip_is_identical(tmp_path_factory, seed, requests, layers, experts, weights, domains,
                                           data):
    top_k = data.draw(st.integers(1, experts))
    trace = random_trace(seed, requests, layers, experts, top_k, weights, domains)
    path = tmp_path_factory.mktemp("t") / "trace.npz"
    trace.save(path)
    loaded = Trace.load(path)
    assert loaded == trace
    for name in ("experts", "request", "phase", "domain"):
        assert getattr(loaded, name).dtype == getattr(trace, name).dtype
        np.testing.assert_array_equal(getattr(loaded, name), getattr(trace, name))
    raw = np.load(path, allow_pickle=False)  # plain numpy can read the format
    assert set(raw.files) == {"experts", "request", "phase", "domain", "model", "num_experts", "top_k"} | (
        {"weights"} if weights else set())
    assert str(raw["model"]) == "tiny-moe" and int(raw["num_experts"]) == experts and int(raw["top_k"]) == top_k


def test_save_writes_exactly_the_given_path(tmp_path):
    path = tmp_path / "no_suffix"
    random_trace().save(path)
    assert path.exists() and not (tmp_path / "no_suffix.npz").exists()


# ---- selection, per-request views, concat ---------------------------------------------------------------------
def test_request_ranges_and_domains_match_brute_force():
    trace = random_trace(3, num_requests=7)
    starts, ends = trace.request_ranges()
    for r in range(trace.num_requests):
        rows = [n for n in range(trace.num_tokens) if trace.request[n] == r]
        assert (starts[r], ends[r]) == (rows[0], rows[-1] + 1)
        assert trace.request_domains()[r] == trace.domain[rows[0]]
    assert random_trace(domains=False).request_domains().shape == (0,)


def test_select_renumbers_requests_densely():
    trace = random_trace(5, num_requests=6)
    decode = trace.where(phase="decode")
    kept = trace.phase == 1
    np.testing.assert_array_equal(decode.experts, trace.experts[kept])
    old_ids = trace.request[kept]
    expected = {old: new for new, old in enumerate(dict.fromkeys(old_ids.tolist()))}
    np.testing.assert_array_equal(decode.request, [expected[r] for r in old_ids])
    assert decode.num_requests == len(expected)
    assert (trace.where(phase=0).phase == 0).all() and (trace.where(phase=-1).phase == -1).all()


def test_where_domain_and_requests_and_layers():
    trace = random_trace(7, num_requests=8)
    code = trace.where(domain=["code", "math"])
    assert set(code.domain.tolist()) <= {"code", "math"}
    assert code.num_tokens == int(np.isin(trace.domain, ["code", "math"]).sum())
    picked = trace.requests([5, 2])
    starts, ends = trace.request_ranges()
    np.testing.assert_array_equal(picked.experts, np.concatenate([trace.experts[starts[2]:ends[2]],
                                                                   trace.experts[starts[5]:ends[5]]]))
    np.testing.assert_array_equal(picked.request, np.repeat([0, 1], [ends[2] - starts[2], ends[5] - starts[5]]))
    np.testing.assert_array_equal(trace.layers([2, 0]).experts, trace.experts[:, [2, 0]])
    assert trace.where(phase=1, domain="nothing").num_tokens == 0
    with pytest.raises(ValueError, match="phase"):
        trace.where(phase="warmup")
    with pytest.raises(ValueError, match="request ids"):
        trace.requests([8])
    with pytest.raises(ValueError, match="token_mask"):
        trace.select(np.ones(3, bool))
    with pytest.raises(ValueError, match="no domain"):
        random_trace(domains=False).where(domain="code")


def test_concat_renumbers_and_checks_compatibility():
    a, b = random_trace(1, 3), random_trace(2, 4)
    joined = concat([a, b])
    assert joined.num_requests == 7 and joined.num_tokens == a.num_tokens + b.num_tokens
    np.testing.assert_array_equal(joined.request, np.concatenate([a.request, b.request + 3]))
    assert joined.requests([3, 4, 5, 6]) == b
    assert concat([a]) == a
    with pytest.raises(ValueError, match="num_experts"):
        concat([a, random_trace(1, 3, num_experts=9)])
    with pytest.raises(ValueError, match="weights"):
        concat([a, random_trace(1, 3, weights=False)])
    with pytest.raises(ValueError, match="domain"):
        concat([a, random_trace(1, 3, domains=False)])


# ---- invalid in-memory traces ---------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(experts=np.full((3, 1, 2), 8)), "experts ids"),
    (dict(experts=np.full((3, 1, 2), -2)), "experts ids"),
    (dict(experts=np.array([[[1, 1]]] * 3)), "repeats"),
    (dict(experts=np.zeros((3, 1, 3))), "must hold integers"),
    (dict(request=[0, 2, 2]), "request ids"),
    (dict(request=[1, 1, 1]), "request ids"),
    (dict(request=[0, 1, 0]), "request ids"),
    (dict(phase=[0, 2, 1]), "phase"),
    (dict(domain=["a", "b", "b"], request=[0, 0, 1]), "constant within a request"),
    (dict(domain=["a", "b"]), "domain"),
    (dict(top_k=3), "top_k"),
    (dict(num_experts=0), "num_experts"),
    (dict(num_experts=2.0), "num_experts"),
    (dict(weights=np.full((3, 1, 2), np.nan)), "finite"),
    (dict(weights=np.full((3, 1, 2), 1e6)), "finite"),
    (dict(weights=np.array([[[0.5, 0.5]], [[0.9, 0.1]], [[-0.2, 1.2]]])), r"weights must be >= 0 .* got -0\.\d+ at token 2"),
    (dict(weights=np.ones((3, 2, 2))), "weights"),
    (dict(model=3), "model"),
])
def test_invalid_traces_are_rejected(change, message):
    fields = dict(experts=np.array([[[0, 1]], [[2, 3]], [[4, -1]]]), request=[0, 0, 1], phase=[0, 1, 0],
                  domain=None, num_experts=8, top_k=2, model="m")
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        Trace(**fields)


# ---- hostile and damaged files --------------------------------------------------------------------------------
BAD_REPLACEMENTS = {
    "experts": [lambda a: a.astype(np.int32), lambda a: a.astype(np.float32), lambda a: a[:, :, :1],
                lambda a: a[:-1], lambda a: a.reshape(-1), lambda a: a.astype(">i2"),
                lambda a: np.full_like(a, 999), lambda a: np.full_like(a, -5), lambda a: np.array(a, dtype=object)],
    "request": [lambda a: a.astype(np.int64), lambda a: a[::-1].copy(), lambda a: a + 1, lambda a: a[:-1],
                lambda a: a * 2, lambda a: np.array(a, dtype=object)],
    "phase": [lambda a: a.astype(np.int16), lambda a: np.full_like(a, 3), lambda a: a[None]],
    "domain": [lambda a: a.astype("S10"), lambda a: a[:-1], lambda a: np.array(a, dtype=object),
               lambda a: a[None]],
    "weights": [lambda a: a.astype(np.float32), lambda a: np.full_like(a, np.inf), lambda a: a[:, :1],
                lambda a: np.array(a, dtype=object)],
    "model": [lambda a: np.array(["m", "n"]), lambda a: np.array(3), lambda a: np.array(b"m"),
              lambda a: np.array("m", dtype=object)],
    "num_experts": [lambda a: np.array(2), lambda a: np.array(8.0), lambda a: np.array([8]), lambda a: np.array(0),
                    lambda a: np.array(10**6), lambda a: np.array("8"), lambda a: np.array(True)],
    "top_k": [lambda a: np.array(3), lambda a: np.array(0), lambda a: np.array(2.0), lambda a: np.array([2])],
}
CASES = [(name, i) for name, fns in BAD_REPLACEMENTS.items() for i in range(len(fns))]


@pytest.mark.parametrize("name, index", CASES)
def test_file_with_a_bad_array_is_rejected(name, index):
    arrays = trace_arrays(random_trace(11))
    arrays[name] = BAD_REPLACEMENTS[name][index](arrays[name])
    with pytest.raises(ValueError, match=name if name not in ("request", "experts") else "."):
        load_bytes(write_npz(arrays))


@pytest.mark.parametrize("name", ["experts", "request", "phase", "domain", "model", "num_experts", "top_k"])
def test_file_missing_an_array_is_rejected(name):
    arrays = trace_arrays(random_trace(12))
    del arrays[name]
    with pytest.raises(ValueError, match=f"missing arrays \\['{name}'\\]"):
        load_bytes(write_npz(arrays))


def test_file_with_an_extra_array_or_a_plain_pickle_is_rejected():
    arrays = trace_arrays(random_trace(13))
    with pytest.raises(ValueError, match="unexpected arrays \\['payload'\\]"):
        load_bytes(write_npz(dict(arrays, payload=np.arange(3))))
    with pytest.raises(ValueError, match="neither Parquet nor a readable .npz trace"):
        load_bytes(pickle.dumps(random_trace(13)))
    buffer = io.BytesIO()
    np.save(buffer, np.arange(4))  # a bare .npy, not an archive
    with pytest.raises(ValueError, match="neither Parquet nor a readable .npz trace"):
        load_bytes(buffer.getvalue())


def test_header_lying_about_the_shape_is_rejected():
    """A member whose header claims far more data than it holds must not allocate it or hang."""
    arrays = trace_arrays(random_trace(14))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.save(member, array)
            raw = member.getvalue()
            if name == "phase":  # a valid header that claims shape (10**11,), followed by the real N bytes
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(header, dict(descr="|i1", fortran_order=False,
                                                                  shape=(10**11,)))
                raw = header.getvalue() + array.tobytes()
            archive.writestr(f"{name}.npy", raw)
    with pytest.raises(ValueError, match="declares"):
        load_bytes(buffer.getvalue())


@FUZZ
@given(seed=st.integers(0, 10**6), fraction=st.floats(0.0, 0.999))
def test_truncated_files_are_rejected(seed, fraction):
    data = to_bytes(random_trace(seed % 50))
    with pytest.raises(ValueError):
        load_bytes(data[:int(len(data) * fraction)])


@FUZZ
@given(seed=st.integers(0, 10**6), positions=st.lists(st.floats(0, 0.9999), min_size=1, max_size=8),
       values=st.lists(st.integers(0, 255), min_size=8, max_size=8))
def test_corrupted_bytes_are_rejected_or_harmless(seed, positions, values):
    """Overwriting random bytes either raises ValueError or (e.g. a timestamp byte) leaves the trace intact."""
    trace = random_trace(seed % 50)
    data = bytearray(to_bytes(trace))
    for position, value in zip(positions, values):
        data[int(position * len(data))] = value
    try:
        loaded = load_bytes(bytes(data))
    except ValueError:
        return
    assert loaded == trace


@FUZZ
@given(seed=st.integers(0, 10**6), name=st.sampled_from(["experts", "request", "phase", "weights"]),
       data=st.data())
def test_random_values_in_one_array_are_rejected_or_valid(seed, name, data):
    """Hostile contents of the right dtype and shape: either a ValueError or a trace that passes validation."""
    arrays = trace_arrays(random_trace(seed % 50))
    array = arrays[name]
    flat = array.reshape(-1).copy()
    index = data.draw(st.integers(0, flat.size - 1))
    info = np.finfo(array.dtype) if array.dtype.kind == "f" else np.iinfo(array.dtype)
    flat[index] = data.draw(st.sampled_from([info.min, info.max, -1, 0, 1]))
    arrays[name] = flat.reshape(array.shape)
    try:
        loaded = load_bytes(write_npz(arrays))
    except ValueError:
        return
    loaded.validate()
    assert getattr(loaded, name).reshape(-1)[index] == flat[index]


def zip_members(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, raw in members:
            archive.writestr(name, raw)
    return bytearray(buffer.getvalue())


def npy_bytes(array):
    member = io.BytesIO()
    np.save(member, array)
    return member.getvalue()


def test_forged_uncompressed_size_is_rejected_before_reading():
    """A zip directory claiming 2 GiB for a tiny member (a zip bomb's shape) is refused up front."""
    arrays = trace_arrays(random_trace(15))
    data = zip_members([(f"{name}.npy", npy_bytes(array)) for name, array in arrays.items()])
    central = data.index(b"PK\x01\x02")
    while True:  # find phase.npy's central-directory record; its uncompressed size is at offset 24
        name_length = int.from_bytes(data[central + 28:central + 30], "little")
        if data[central + 46:central + 46 + name_length] == b"phase.npy":
            break
        central = data.index(b"PK\x01\x02", central + 4)
    data[central + 24:central + 28] = (2**31).to_bytes(4, "little")
    with pytest.raises(ValueError, match="more than deflate can produce"):
        load_bytes(bytes(data))


def test_duplicate_members_are_rejected():
    arrays = trace_arrays(random_trace(16))
    members = [(f"{name}.npy", npy_bytes(array)) for name, array in arrays.items()]
    with pytest.warns(UserWarning, match="Duplicate name"):
        data = zip_members(members + [("experts.npy", npy_bytes(arrays["experts"]))])
    with pytest.raises(ValueError, match="appears twice"):
        load_bytes(bytes(data))


# ---- one label for the whole file; errors that name the file, the token and the layer -------------------------
def test_a_single_domain_string_labels_every_token(tmp_path):
    trace = random_trace(13, domains=False)
    arrays = trace_arrays(trace)
    arrays["domain"] = np.array("code")  # 0-d: one workload per file, as hand-made traces often are
    path = tmp_path / "code.npz"
    path.write_bytes(write_npz(arrays))
    loaded = Trace.load(path)
    assert loaded.domain.shape == (trace.num_tokens,) and set(loaded.domain.tolist()) == {"code"}
    assert loaded.request_domains().tolist() == ["code"] * trace.num_requests
    assert loaded.where(domain="code").num_tokens == trace.num_tokens
    built = Trace(experts=trace.experts, request=trace.request, phase=trace.phase, domain="code",
                  num_experts=trace.num_experts, top_k=trace.top_k, model=trace.model)
    assert np.array_equal(built.domain, loaded.domain)
    loaded.save(tmp_path / "again.npz")
    assert Trace.load(tmp_path / "again.npz") == loaded  # saved as one label per token
    empty = Trace(experts=np.zeros((0, 1, 2)), request=[], phase=[], domain="code", num_experts=8, top_k=2)
    assert empty.domain.shape == (0,)


def test_errors_of_a_loaded_file_name_the_file_token_and_layer(tmp_path):
    trace = random_trace(14)
    arrays = trace_arrays(trace)
    arrays["experts"] = arrays["experts"].copy()
    arrays["experts"][5, 2, 1] = 8  # num_experts is 8: ids 0..7
    path = tmp_path / "bad-ids.npz"
    path.write_bytes(write_npz(arrays))
    request = int(trace.request[5])
    with pytest.raises(ValueError, match=rf"bad-ids\.npz.*token 5 \(request {request}\) has \[.*8\] in MoE layer 2"):
        Trace.load(path)
    arrays = trace_arrays(trace)
    arrays["phase"] = np.full_like(arrays["phase"], 3)
    path = tmp_path / "bad-phase.npz"
    path.write_bytes(write_npz(arrays))
    with pytest.raises(ValueError, match=r"trace file '.*bad-phase\.npz': phase values"):
        Trace.load(path)
    with pytest.raises(FileNotFoundError):
        Trace.load(tmp_path / "missing.npz")


@pytest.mark.parametrize("kwargs, message", [
    (dict(popularity_std=float("nan")), "popularity_std must be a finite number >= 0, got nan"),
    (dict(domain_std=-1.0), "domain_std must be a finite number >= 0, got -1.0"),
    (dict(prefill_fraction=1.5), r"prefill_fraction must be a number in \[0, 1\], got 1.5"),
    (dict(num_requests=2.5), "num_requests must be a whole number >= 1, got 2.5"),
    (dict(num_layers=0), "num_layers must be a whole number >= 1, got 0"),
    (dict(seed=-1), "seed must be a whole number >= 0, got -1"),
])
def test_synthetic_traces_name_a_bad_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):  # never a degenerate trace from a NaN spread
        synthetic_trace(**kwargs)
    with pytest.raises(ValueError, match="num_domains must be a whole number >= 1, got 0"):
        planted_trace(num_domains=0)


def test_the_npz_reader_and_writer_point_to_parquet_for_a_parquet_path(tmp_path):
    trace = synthetic_trace(num_requests=2, tokens_per_request=4)
    with pytest.raises(ValueError, match="Trace.save writes .npz; minimoe.traces.parquet_writer.save_trace writes Parquet"):
        trace.save(tmp_path / "t.parquet")
    assert not (tmp_path / "t.parquet").exists()
    from minimoe.traces.parquet_writer import save_trace

    save_trace(trace, tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="Trace.load reads .npz; minimoe.traces.parquet.load_trace reads Parquet"):
        Trace.load(tmp_path / "t.parquet")
