"""Expert parallelism on real processes (gloo on CPU) against the single-process MoE layer and the accounting.

One launch of 4 processes runs everything in this module (sub-groups give world sizes 1 to 4): many random
cases (placements with and without replicas, 1 or 2 "nodes", every wire format (replicate with padded blocks,
its sizes passed or agreed) and the static-shape mode,
top-k 1 to 8, capacity on and off, three router families, shared experts, ranks with no tokens) compare
outputs and gradients (input, router, experts, shared expert) with ``MoELayer`` on the ranks'
concatenated batch at fp32, rtol = atol = 1e-5, and the byte counters and per-rank loads with
``minimoe.placement.measure``; the bundled model gives the same logits expert-parallel; mismatched
configurations are reported before any exchange.

A second phase in the same processes breaks ranks on purpose: in group {0, 1} rank 1 raises before the
exchange and rank 0's dispatch must fail at once (gloo: the peer's connection closes); in group {2, 3},
created with a short timeout, rank 3 sleeps past it and rank 2's layer must fail after about that timeout.
Both errors name the exchange, the rank and the cause.
"""
from __future__ import annotations

import datetime
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from parallel_ranks import run_ranks, values

from minimoe.model import MoEConfig, MoELayer, Transformer
from minimoe.parallel import WIRE_FORMATS, ExpertParallelMoE, RouteTable, dispatch, expert_parallel
from minimoe.parallel.comm import all_reduce_sum
from minimoe.parallel.replay import predicted_bytes
from minimoe.placement import Placement, measure
from minimoe.traces import BUNDLED_MODEL, Trace

NUM_CASES = 96
GROUP_TIMEOUT_S = 2.0
TOL = dict(rtol=1e-5, atol=1e-5)


def make_case(seed: int) -> dict:
    """A random case, the same on every rank."""
    rng = np.random.default_rng(seed)
    world = 1 + seed % 4
    top_k = 1 + (seed // 4) % 8
    num_nodes = int(rng.choice([n for n in (1, 2, world) if world % n == 0]))
    family = str(rng.choice(["softmax", "softmax", "deepseek_v3", "llama4"]))
    num_experts = int(rng.integers(max(top_k, 2), 17))
    if rng.random() < 0.4:  # no replicas: one slot per expert
        num_experts = -(-num_experts // world) * world
        slots = num_experts
    else:
        slots = (-(-num_experts // world) + int(rng.integers(0, 3))) * world
    extra = rng.integers(0, num_experts, slots - num_experts)  # replicas
    phy2log = rng.permutation(np.concatenate([np.arange(num_experts), extra]))
    tokens = rng.integers(0, 10, size=world)
    if world > 1 and rng.random() < 0.4:
        tokens[rng.integers(world)] = 0
    tokens[rng.integers(world)] += 1  # at least one token in the batch
    n_group = 2 if family == "deepseek_v3" and num_experts % 2 == 0 and top_k <= num_experts // 2 else 1
    wire_format = WIRE_FORMATS[(seed // 24) % 4]
    static = wire_format in ("token_rank", "replicate") and seed % 3 == 0  # fixed shapes: same T, dropless
    if static:
        tokens[:] = int(rng.integers(1, 8))
    known = wire_format == "replicate" and not static and seed % 2 == 0  # the caller passes tokens_per_rank
    return dict(seed=seed, world=world, wire_format=wire_format, static=static, known=known, num_nodes=num_nodes,
                family=family, num_experts=num_experts, top_k=top_k, phy2log=phy2log.tolist(),
                tokens=tokens.tolist(), capacity_factor=0.0 if static else float(rng.choice([0.0, 0.0, 0.5, 1.0, 1.5])),
                shared=int(rng.integers(0, 2)), hidden=int(rng.choice([8, 12, 16])), width=int(rng.choice([4, 8])),
                n_group=n_group, norm=bool(rng.random() < 0.7))


def _moe(case) -> MoELayer:
    torch.manual_seed(case["seed"])
    deepseek = case["family"] == "deepseek_v3"
    config = MoEConfig(num_experts=case["num_experts"], top_k=case["top_k"], intermediate_size=case["width"],
                       router=case["family"], norm_topk_prob=case["norm"], num_shared_experts=case["shared"],
                       n_group=case["n_group"], routed_scaling_factor=2.5 if deepseek else 1.0,
                       capacity_factor=case["capacity_factor"])
    moe = MoELayer(case["hidden"], config)
    if deepseek:
        moe.router.e_score_correction_bias.normal_(std=0.1)
    return moe


def _grad(p):
    return torch.zeros_like(p) if p.grad is None else p.grad


def run_case(case, group, rank) -> dict:
    moe = _moe(case)
    world, tokens, hidden = case["world"], case["tokens"], case["hidden"]
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    xs = [torch.randn(t, hidden, generator=generator) for t in tokens]
    full = torch.cat(xs).requires_grad_()
    reference = moe(full)  # (ΣT, H) the single-process layer
    grad_out = torch.randn(reference.shape, generator=generator)
    (reference * grad_out).sum().backward()
    placement = Placement(np.array([case["phy2log"]]), case["num_experts"], case["num_nodes"],
                          world // case["num_nodes"])
    layer = ExpertParallelMoE(moe, placement, 0, group, case["wire_format"], static=case["static"])
    first = sum(tokens[:rank])
    mine = slice(first, first + tokens[rank])
    x = xs[rank].clone().requires_grad_()
    y = layer(x, token_index=torch.arange(mine.start, mine.stop), tokens_per_rank=tokens if case["known"] else None)
    (y * grad_out[mine]).sum().backward()

    checks = {"output": torch.allclose(y, reference[mine].detach(), **TOL),
              "input grad": torch.allclose(_grad(x), full.grad[mine], **TOL)}
    router = all_reduce_sum(_grad(layer.router.weight).clone(), group)
    checks["router grad"] = torch.allclose(router, moe.router.weight.grad, **TOL)
    gate_up, down = layer.gather_experts(grads=True)
    checks["expert grads"] = torch.allclose(gate_up, moe.gate_up_proj.grad, **TOL) and \
        torch.allclose(down, moe.down_proj.grad, **TOL)
    weights = layer.gather_experts()
    checks["expert weights"] = torch.equal(weights[0], moe.gate_up_proj.detach()) or \
        torch.allclose(weights[0], moe.gate_up_proj.detach(), rtol=1e-6, atol=0)
    if moe.shared_expert is not None:
        checks["shared grads"] = all(
            torch.allclose(all_reduce_sum(_grad(p).clone(), group), q.grad, **TOL)
            for p, q in zip(layer.shared_expert.parameters(), moe.shared_expert.parameters()))

    # the accounting, on the same tokens, placement and sources
    kept = moe.last_routing.expert_ids if moe.last_kept is None else moe.last_routing.expert_ids.masked_fill(
        ~moe.last_kept, -1)
    busy = [r for r in range(world) if tokens[r]]
    trace = Trace(experts=kept.numpy()[:, None, :], request=np.repeat(np.arange(len(busy)), [tokens[r] for r in busy]),
                  phase=np.zeros(sum(tokens), dtype=np.int8), domain=None, num_experts=case["num_experts"],
                  top_k=case["top_k"])
    report = measure(trace, placement, placement.topology, sources=np.array(busy), hidden_size=hidden,
                     bytes_per_element=4, combine_bytes_per_element=4)
    counted = layer.counters.summed(group)
    if case["static"] and case["wire_format"] == "token_rank":  # every token to every other rank, both ways
        remote = 2 * sum(tokens) * (world - 1) * hidden * 4
        checks["bytes == G·T rows"] = counted.link_bytes("intra") + counted.link_bytes("inter") == remote
    else:
        predicted = predicted_bytes(report, case["wire_format"], placement.topology)
        checks["bytes == measure"] = all(counted.link_bytes(link) == predicted[link] for link in ("intra", "inter"))
    if case["wire_format"] == "replicate":  # blocks padded to the largest rank's: (B - T_r) rows per leg and peer
        block, entries = max(tokens), 12 * case["top_k"]  # an int64 slot id and a float32 weight per entry
        padding = sum((world - 1) * (block - t) * (hidden * 4 + entries) + (world - 1) * (block - t) * hidden * 4
                      for t in tokens)
        checks["padding bytes"] = counted.padding_bytes == padding
    pairs = torch.zeros(world, dtype=torch.int64)
    pairs[rank] = layer.received_pairs
    pairs = all_reduce_sum(pairs, group)
    checks["load == measure"] = pairs.tolist() == report.per_layer["tokens_per_rank"][0].astype(int).tolist()
    return dict(case={k: v for k, v in case.items() if k != "phy2log"}, failed=[k for k, v in checks.items() if not v],
                received_nothing=int(layer.received_pairs) == 0, dropped=int(moe.dropped_tokens),
                replicas=len(case["phy2log"]) > case["num_experts"])


def run_model(rank, world) -> dict:
    """The bundled model on 4 ranks, 2 "nodes", with replicas: logits per wire format."""
    torch.manual_seed(0)
    model = Transformer.load(BUNDLED_MODEL).eval()
    experts = model.config.moe.num_experts
    rng = np.random.default_rng(0)
    phy2log = np.stack([np.concatenate([rng.permutation(experts), rng.integers(0, experts, 8)])
                        for _ in range(model.config.num_layers)])
    placement = Placement(phy2log, experts, num_nodes=2, gpus_per_node=2)
    ids = torch.randint(0, model.config.vocab_size, (2 * world, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids)[2 * rank:2 * rank + 2]
    errors = {}
    for fmt in WIRE_FORMATS:
        parallel = expert_parallel(Transformer.load(BUNDLED_MODEL).eval(), placement, None, fmt)
        with torch.no_grad():
            logits = parallel(ids[2 * rank:2 * rank + 2])
        # how far past assert_close(rtol=1e-5, atol=1e-5) the worst logit is (<= 0: within); logits are ~10
        errors[fmt] = float(((logits - reference).abs() - 1e-5 * reference.abs()).max())
    return errors


def run_mismatches(rank, world) -> dict:
    """Each rank builds a layer that differs from rank 0's in one field; every rank must raise, naming it."""
    messages = {}
    for field, odd_rank in (("top_k", 1), ("placement", 2), ("dtype", 3), ("hidden size", 1)):
        case = make_case(7)  # world 4
        case = dict(case, world=world, num_nodes=2, num_experts=8, phy2log=list(range(8)), capacity_factor=0.0,
                    tokens=[3] * world, hidden=8, top_k=2)
        if rank == odd_rank and field == "top_k":
            case["top_k"] = 3
        if rank == odd_rank and field == "hidden size":
            case["hidden"] = 12
        moe = _moe(case)
        phy2log = case["phy2log"][::-1] if rank == odd_rank and field == "placement" else case["phy2log"]
        layer = ExpertParallelMoE(moe, Placement(np.array([phy2log]), 8, 2, world // 2), 0, None, "token_rank")
        x = torch.randn(3, case["hidden"])
        if rank == odd_rank and field == "dtype":
            layer, x = layer.double(), x.double()
        try:
            layer(x)
            messages[field] = None
        except ValueError as error:
            messages[field] = str(error)
        messages[field + " sent bytes"] = sum(layer.counters.bytes.values())
    return messages


def one_rank_with_collectives(rank, group) -> dict:
    """Rank 0 alone in a group of one, the collectives forced to run: every format still equals MoELayer."""
    from minimoe.parallel import collectives_at_one_rank

    errors = {}
    torch.manual_seed(5)
    moe = MoELayer(8, MoEConfig(num_experts=4, top_k=2, intermediate_size=4))
    x = torch.randn(6, 8, requires_grad=True)
    reference = moe(x)
    for fmt in WIRE_FORMATS:
        layer = ExpertParallelMoE(moe, Placement(np.array([[2, 0, 3, 1, 0]]), 4, 1, 1), 0, group, fmt)
        x2 = x.detach().clone().requires_grad_()
        with collectives_at_one_rank():
            out = layer(x2)
            out.sum().backward()
        reference.sum().backward(retain_graph=True)
        errors[fmt] = max(float((out - reference).abs().max()), float((x2.grad - x.grad).abs().max()))
        x.grad = None
    return errors


def collectives(rank, world):
    """all_gather_into / reduce_scatter_into on gloo (list all-gather; all-to-all + sum) and torch's own calls."""
    import warnings

    from minimoe.parallel.comm import all_gather_into, reduce_scatter_into

    block = torch.arange(6.0).view(3, 2) + 10 * rank
    blocks = torch.arange(6.0 * world).view(3 * world, 2) * (rank + 1)
    ours = (all_gather_into(torch.empty(3 * world, 2), block).tolist(),
            reduce_scatter_into(torch.empty(3, 2), blocks).tolist())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.13 renamed them *_single
            gathered, scattered = torch.empty(3 * world, 2), torch.empty(3, 2)
            dist.all_gather_into_tensor(gathered, block)
            dist.reduce_scatter_tensor(scattered, blocks)
        native = (gathered.tolist(), scattered.tolist())
    except RuntimeError:  # not every torch release has them on gloo
        native = None
    return dict(ours=ours, native=native, many=gathered_many(rank))


def gathered_many(rank):
    """``comm.gathered`` of a bf16, a float32 and an int64 block: gloo's list form, then the coalesced launch
    NCCL takes (each tensor as bytes), which gloo runs too in this torch; exact values per rank."""
    from minimoe.parallel import comm

    blocks = [torch.arange(6.0).view(3, 2).bfloat16() + rank, torch.full((3, 4), 0.5 + rank),
              torch.arange(3 * 5).view(3, 5) + 100 * rank]
    plain = [out.tolist() for out in comm.gathered(blocks)]
    gloo = comm._gloo
    comm._gloo = lambda group: False  # take the coalesced path
    try:
        coalesced = [out.tolist() for out in comm.gathered(blocks)]
    finally:
        comm._gloo = gloo
    return dict(plain=plain, coalesced=coalesced, dtypes=[str(b.dtype) for b in comm.gathered(blocks)])


def failing(rank, world):
    pair_a = dist.new_group([0, 1])
    pair_b = dist.new_group([2, 3], timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose before the exchange")
    if rank == 3:
        time.sleep(2.5 * GROUP_TIMEOUT_S)  # never joins in time
        return "slept"
    torch.manual_seed(0)
    moe = MoELayer(8, MoEConfig(num_experts=4, top_k=2, intermediate_size=4))
    placement = Placement(np.array([[0, 1, 2, 3]]), 4, num_nodes=1, gpus_per_node=2)
    x = torch.randn(5, 8)
    start = time.monotonic()
    try:
        if rank == 0:  # the raw exchange
            table = RouteTable(placement, 0)
            slots = table.route(torch.tensor([[0, 3]] * 5), 0, torch.arange(5))
            dispatch(x, slots, torch.full((5, 2), 0.5), table, "token_rank", pair_a)
        else:  # the layer (its first collective is the configuration check)
            ExpertParallelMoE(moe, placement, 0, pair_b)(x)
    except RuntimeError as error:
        return dict(message=str(error), seconds=time.monotonic() - start)
    return dict(message=None, seconds=time.monotonic() - start)


def all_checks(rank, world):
    groups = {size: dist.new_group(list(range(size))) for size in (1, 2, 3)}
    groups[4] = dist.group.WORLD
    results = []
    for seed in range(NUM_CASES):
        case = make_case(seed)
        if rank < case["world"]:
            results.append(run_case(case, groups[case["world"]], rank))
    return dict(cases=results, model=run_model(rank, world), mismatches=run_mismatches(rank, world),
                collectives=collectives(rank, world),
                forced=one_rank_with_collectives(rank, groups[1]) if rank == 0 else None)


@pytest.fixture(scope="module")
def launch():
    return run_ranks([all_checks, failing], 4, timeout_s=60.0)


@pytest.fixture(scope="module")
def outcomes(launch):
    return values(launch[0])


def test_outputs_and_gradients_equal_the_single_process_layer(outcomes):
    failed = [(r["case"], r["failed"]) for ranks in outcomes for r in ranks["cases"] if r["failed"]]
    assert not failed, f"{len(failed)} rank-cases failed, first: {failed[:3]}"


def test_the_cases_cover_what_they_claim(outcomes):
    cases = [r for ranks in outcomes for r in ranks["cases"]]
    assert len(cases) == sum(make_case(s)["world"] for s in range(NUM_CASES))
    seen = {(c["case"]["world"], c["case"]["wire_format"]) for c in cases}
    assert seen == {(w, f) for w in (1, 2, 3, 4) for f in WIRE_FORMATS}
    assert {c["case"]["top_k"] for c in cases} == set(range(1, 9))
    assert {c["case"]["family"] for c in cases} == {"softmax", "deepseek_v3", "llama4"}
    assert {c["case"]["world"] for c in cases if c["case"]["static"]} == {1, 2, 3, 4}
    assert {(c["case"]["wire_format"], c["case"]["static"]) for c in cases if c["case"]["static"]} == \
        {("token_rank", True), ("replicate", True)}
    uneven = [c for c in cases if c["case"]["wire_format"] == "replicate" and len(set(c["case"]["tokens"])) > 1]
    assert uneven and {c["case"]["known"] for c in uneven} == {True, False}  # padded, sizes given and agreed
    assert any(c["received_nothing"] for c in cases), "no rank ever received zero rows"
    assert any(c["case"]["tokens"][0] == 0 for c in cases), "no rank ever sent zero rows"
    assert any(c["dropped"] > 0 for c in cases), "capacity never dropped a pair"
    assert any(c["replicas"] for c in cases) and not all(c["replicas"] for c in cases)
    assert {c["case"]["num_nodes"] for c in cases if c["case"]["world"] == 4} >= {1, 2, 4}


def test_gloo_all_gather_and_reduce_scatter_equal_the_definition_and_torch(outcomes):
    world = len(outcomes)
    gathered = torch.cat([torch.arange(6.0).view(3, 2) + 10 * r for r in range(world)]).tolist()
    for rank, ranks in enumerate(outcomes):
        scattered = (torch.arange(6.0 * world).view(world, 3, 2)[rank] * sum(r + 1 for r in range(world))).tolist()
        assert ranks["collectives"]["ours"] == (gathered, scattered)
        if ranks["collectives"]["native"] is not None:
            assert ranks["collectives"]["native"] == ranks["collectives"]["ours"]


def test_gathering_blocks_of_every_dtype_plainly_and_coalesced_equals_the_definition(outcomes):
    world = len(outcomes)
    want = [torch.cat([torch.arange(6.0).view(3, 2) + r for r in range(world)]).tolist(),
            torch.cat([torch.full((3, 4), 0.5 + r) for r in range(world)]).tolist(),
            torch.cat([torch.arange(15).view(3, 5) + 100 * r for r in range(world)]).tolist()]
    for ranks in outcomes:
        many = ranks["collectives"]["many"]
        assert many["plain"] == want and many["coalesced"] == want
        assert many["dtypes"] == ["torch.bfloat16", "torch.float32", "torch.int64"]


def test_one_rank_with_its_collectives_forced_equals_the_single_process_layer(outcomes):
    errors = outcomes[0]["forced"]
    assert set(errors) == set(WIRE_FORMATS) and max(errors.values()) <= 1e-5, errors


def test_bundled_model_logits_equal_one_process(outcomes):
    for rank, ranks in enumerate(outcomes):
        for fmt, error in ranks["model"].items():
            assert error <= 1e-5, f"rank {rank} {fmt}: max |logits EP - one process| - 1e-5 |logits| = {error}"


@pytest.mark.parametrize("field", ["top_k", "placement", "dtype", "hidden size"])
def test_mismatched_configurations_are_reported_before_any_exchange(outcomes, field):
    for rank, ranks in enumerate(outcomes):
        message = ranks["mismatches"][field]
        assert message is not None, f"rank {rank} ran a layer whose {field} differs across ranks"
        assert f"ranks disagree before any exchange: {field} is" in message, message
        assert ranks["mismatches"][field + " sent bytes"] == 0


def test_a_failed_or_absent_rank_makes_the_others_fail_clearly_within_the_timeout(launch):
    outcomes = launch[1]
    assert outcomes[1]["status"] == "error" and "fails on purpose" in outcomes[1]["value"]
    assert outcomes[3]["status"] == "ok"
    raised, absent = outcomes[0], outcomes[2]
    for outcome in (raised, absent):
        assert outcome["status"] == "ok", outcome["value"]
        message = outcome["value"]["message"]
        assert message is not None, "the exchange returned although its peer was gone"
        assert "expert-parallel" in message and "another rank raised, exited or did not join" in message
        assert "Cause:" in message
    assert "count exchange" in raised["value"]["message"] and "rank 0 of 2" in raised["value"]["message"]
    assert raised["value"]["seconds"] < 20  # a closed connection is seen at once, not after the 60 s timeout
    assert "configuration check" in absent["value"]["message"] and "rank 0 of 2" in absent["value"]["message"]
    assert GROUP_TIMEOUT_S * 0.8 <= absent["value"]["seconds"] < GROUP_TIMEOUT_S + 5
