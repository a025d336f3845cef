"""Expert placement as hypergraph partitioning: experts are vertices, tokens are hyperedges.

One MoE layer's fitting tokens define a hypergraph. Vertex ``e`` is an expert, with weight
``load[e]`` = the (token, expert) pairs routed to it; every token is a hyperedge holding the experts it
chose. Placing experts on ``N`` nodes is a partition ``home: expert -> node``. A de-duplicating
(hierarchical) all-to-all sends a token once to each node other than its own that serves one of its
experts, so when token ``t`` starts on node ``s(t)`` the inter-node volume is

    cost(home) = sum_t w_t * | { home[e] : e in t } \\ { s(t) } |                               (1)

Known sources are *fixed vertices*: one extra vertex per node, pinned to that node, joins the hyperedge of
every token that starts there. With ``lambda_t`` = the number of distinct nodes hyperedge ``t`` touches
(its *connectivity*), (1) is then exactly the connectivity metric that hypergraph partitioners minimise,

    km1(home) = sum_t w_t * (lambda_t - 1)                                                        (2)

(without sources, (1) counts ``lambda_t`` itself, which differs from (2) by the constant ``sum_t w_t``:
the minimisers agree). Tokens with the same expert set and source node are one hyperedge of weight
``w_t`` = their count (``Hypergraph.merged``), which shrinks the fitting set of a small model by orders of magnitude.
Balance constraint: every node's load ``sum_{home[e] = n} load[e] <= (1 + epsilon) * mean``.

``Hypergraph.gains`` gives the exact change of (1) for every single move and swap at once (the
Kernighan–Lin / Fiduccia–Mattheyses gains of ``minimoe.placement.refinement``);
``partition_mtkahypar`` hands the same hypergraph to Mt-KaHyPar (Gottesbüren, Heuer, Maas, Sanders,
Schlag: "Scalable High-Quality Hypergraph Partitioning", ACM TOPS 2024; fixed vertices and the (λ−1)
objective as in its documentation, https://github.com/kahypar/mt-kahypar), an optional dependency.
"""
from __future__ import annotations

import functools

import numpy as np

MTKAHYPAR_PRESETS = ("default", "quality", "highest_quality", "deterministic", "deterministic_quality")
# The preset every fit uses unless told otherwise: Mt-KaHyPar's "default" and "quality" presets can return another
# partition for the same input and seed on a later call in the same process (measured with mtkahypar 1.7), so a
# report's placements would depend on which fits a process ran before; the deterministic preset does not.
DEFAULT_MTKAHYPAR_PRESET = "deterministic"


def _sorted_rows(values: np.ndarray) -> np.ndarray:
    """``np.sort(values, axis=1)``; two columns by minimum and maximum, several times faster on many rows."""
    if values.shape[1] == 2:
        return np.column_stack([np.minimum(values[:, 0], values[:, 1]), np.maximum(values[:, 0], values[:, 1])])
    return np.sort(values, axis=1)


class Hypergraph:
    """The tokens of one layer: experts (T, k) int64 (distinct per token, -1 = none), source node pin (T,) or None,
    weight (T,) tokens each row stands for (default 1), slot_need (E,) slots each expert takes on its node
    (default 1; a second vertex weight). Pairs (token, expert) are flattened for numpy."""

    def __init__(self, experts, num_experts, num_nodes, pin=None, weight=None, slot_need=None):
        self.experts, self.num_experts, self.num_nodes, self.pin = experts, num_experts, num_nodes, pin
        self.slot_need = np.ones(num_experts, dtype=np.int64) if slot_need is None else np.asarray(slot_need)
        num_tokens, top_k = experts.shape
        self.weight = np.ones(num_tokens) if weight is None else np.asarray(weight, dtype=float)  # (T,)
        valid = experts >= 0
        self.valid = valid
        self.pair_token = np.broadcast_to(np.arange(num_tokens)[:, None], experts.shape)[valid]  # (P,)
        self.pair_expert = experts[valid]  # (P,)
        self.pair_weight = self.weight[self.pair_token]  # (P,)
        self.load = np.bincount(self.pair_expert, weights=self.pair_weight, minlength=num_experts)  # (E,)

    # The arrays below serve the cost, the gains and the co-activation; a graph that is only merged, sampled or
    # routed (``minimoe.placement.locality_slots``) never builds them.
    @functools.cached_property
    def co_key(self) -> np.ndarray:
        """(C,) e_i * E + e_j of every ordered pair of distinct positions i != j of a token, both valid."""
        first, second = self._position_pairs
        both = self.valid[:, first] & self.valid[:, second]  # (T, k(k-1))
        return (self.experts[:, first] * self.num_experts + self.experts[:, second])[both]

    @functools.cached_property
    def co_position(self) -> np.ndarray:
        """(C,) flat (t, i) of the first position of each entry of ``co_key``."""
        first, second = self._position_pairs
        both = self.valid[:, first] & self.valid[:, second]
        return (np.arange(len(self.experts))[:, None] * self.experts.shape[1] + first[None, :])[both]

    @property
    def _position_pairs(self):
        return np.nonzero(~np.eye(self.experts.shape[1], dtype=bool))  # ordered position pairs i != j

    @functools.cached_property
    def pair_position(self) -> np.ndarray:
        """(P,) flat (t, i) of every pair."""
        return np.flatnonzero(self.valid.ravel())

    @functools.cached_property
    def charge(self) -> np.ndarray:
        """(T, N) c[t, n] * w_t: what reaching node n costs token t (0 on its own node, where traffic is free)."""
        charge = np.ones((len(self.experts), self.num_nodes))
        if self.pin is not None:
            charge[np.arange(len(self.experts)), self.pin] = 0.0
        return charge * self.weight[:, None]

    def merged(self) -> "Hypergraph":
        """The same objective with identical hyperedges (same expert set, same source node) merged."""
        experts = _sorted_rows(np.where(self.experts >= 0, self.experts, np.iinfo(np.int64).max))
        experts = np.where(experts == np.iinfo(np.int64).max, -1, experts)
        keys = experts if self.pin is None else np.column_stack([experts, self.pin])
        width = int(max(self.num_experts, self.num_nodes) + 1).bit_length()  # bits per column, values + 1
        bits = width * keys.shape[1]
        if bits <= 62:  # rows fit one int64 key, first column most significant, so key order is row order
            packed = np.zeros(len(keys), np.int64)
            for column in keys.T:
                packed = (packed << width) | (column + 1)
        if bits <= 20:  # at most 2**20 possible rows: count them by key, no sort (the same order and sums)
            weight = np.bincount(packed, weights=self.weight, minlength=1 << bits)
            present = np.flatnonzero(np.bincount(packed, minlength=len(weight)))
            shifts = width * np.arange(keys.shape[1] - 1, -1, -1)
            unique = ((present[:, None] >> shifts) & ((1 << width) - 1)) - 1
            weight = weight[present]
        else:
            # rows sorted (by their key: a faster sort); equal rows end up next to each other
            order = np.argsort(packed, kind="stable") if bits <= 62 else np.lexsort(keys.T[::-1])
            ordered = keys[order]
            first = np.ones(len(keys), dtype=bool)
            first[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
            unique, group = ordered[first], np.cumsum(first) - 1
            weight = np.bincount(group, weights=self.weight[order], minlength=len(unique))
        pin = None if self.pin is None else unique[:, -1]
        return Hypergraph(unique[:, :self.experts.shape[1]], self.num_experts, self.num_nodes, pin, weight,
                          self.slot_need)

    def sample(self, count: int, rng) -> "Hypergraph":
        """At most ``count`` hyperedges drawn without replacement (all of them if there are fewer), same weights."""
        if self.experts.shape[0] <= count:
            return self
        rows = np.sort(rng.choice(self.experts.shape[0], size=count, replace=False))
        return Hypergraph(self.experts[rows], self.num_experts, self.num_nodes,
                          None if self.pin is None else self.pin[rows], self.weight[rows], self.slot_need)

    def node_slots(self, home) -> np.ndarray:
        """(N,) slots the experts of each node take."""
        return np.bincount(home, weights=self.slot_need, minlength=self.num_nodes).astype(np.int64)

    def counts(self, home):
        """cnt (T, N): experts of each token on each node."""
        num_tokens = self.experts.shape[0]
        return np.bincount(self.pair_token * self.num_nodes + home[self.pair_expert],
                           minlength=num_tokens * self.num_nodes).reshape(num_tokens, self.num_nodes)

    def cost(self, home) -> float:
        """Equation (1): weighted remote nodes (all nodes touched when sources are unknown)."""
        return float(((self.counts(home) > 0) * self.charge).sum())

    def km1(self, home) -> float:
        """Equation (2): the connectivity metric, with the source node counted as a pin when known."""
        touched = self.counts(home) > 0
        if self.pin is not None:
            touched[np.arange(len(self.pin)), self.pin] = True
        return float(((touched.sum(axis=1) - 1) * self.weight).sum())

    def coactivation(self) -> np.ndarray:
        """(E, E) weighted number of tokens choosing both experts."""
        weight = self.weight[self.co_position // self.experts.shape[1]]
        return np.bincount(self.co_key, weights=weight, minlength=self.num_experts ** 2).reshape(self.num_experts, -1)

    def demand(self) -> np.ndarray:
        """(E, N) pairs of each expert coming from tokens that start on node n (needs sources)."""
        return np.bincount(self.pair_expert * self.num_nodes + self.pin[self.pair_token], weights=self.pair_weight,
                           minlength=self.num_experts * self.num_nodes).reshape(self.num_experts, self.num_nodes)

    @functools.cached_property
    def _by_expert(self):
        """The pairs grouped by expert: their tokens (P,) in expert order, and the first pair of each expert
        that has pairs (E',) with those experts' ids (E',)."""
        order = np.argsort(self.pair_expert, kind="stable")
        sizes = np.bincount(self.pair_expert, minlength=self.num_experts)
        present = np.flatnonzero(sizes)
        return self.pair_token[order], (np.cumsum(sizes) - sizes)[present], present

    def _sum_by_expert(self, per_token: np.ndarray) -> np.ndarray:
        """(T, N) -> (E, N): out[e] = sum of per_token[t] over the tokens t holding e (one pass, in C)."""
        tokens, starts, present = self._by_expert
        out = np.zeros((self.num_experts, per_token.shape[1]))
        if len(tokens):
            out[present] = np.add.reduceat(per_token[tokens], starts, axis=0)
        return out

    def gains(self, home, swaps: bool = True):
        """move_gain (E, N) and swap_gain (E, E) (None with ``swaps=False``): the exact drop of (1) for one move
        or swap; -inf where the move or swap changes nothing (an expert's own node, two experts of one node).

        Moving ``e`` from ``a`` to ``b`` saves ``sum_{t ∋ e} [cnt[t,a] = 1] c[t,a] - [cnt[t,b] = 0] c[t,b]``;
        swapping ``e`` (on ``a``) with ``f`` (on ``b``) saves both move gains minus the tokens holding both
        (for which nothing changes)."""
        cnt = self.counts(home)
        flat_cnt, flat_charge = cnt.ravel(), self.charge.ravel()
        where = self.pair_token * self.num_nodes + home[self.pair_expert]  # flat (t, node of e)
        alone, charge = flat_cnt[where] == 1, flat_charge[where]  # e is token t's only expert on its node
        leave = alone * charge  # (P,)
        join = (cnt == 0) * self.charge  # (T, N)
        move = np.bincount(self.pair_expert, weights=leave, minlength=self.num_experts)[:, None] - \
            self._sum_by_expert(join)  # (E, N)
        if not swaps:
            move[np.arange(self.num_experts), home] = -np.inf
            return move, None
        # shared[e, f] = sum of leave(t, e) over the tokens t holding both e and f: only the pairs that leave
        # (e alone on its node, off the token's own) contribute, each with the token's other experts
        leaving = np.flatnonzero(alone & (charge != 0))  # (L,) pairs
        token, position = np.divmod(self.pair_position[leaving], self.experts.shape[1])
        others = self.experts[token]  # (L, k)
        keep = (others >= 0) & (np.arange(self.experts.shape[1]) != position[:, None])
        keys = (self.pair_expert[leaving][:, None] * self.num_experts + others)[keep]
        weights = np.broadcast_to(leave[leaving][:, None], others.shape)[keep]
        shared = np.bincount(keys, weights=weights, minlength=self.num_experts ** 2).reshape(self.num_experts, -1)
        swap = move[:, home].T + move[:, home] - shared - shared.T  # [e, f]: e -> home[f], f -> home[e]
        swap[home[:, None] == home[None, :]] = -np.inf
        move[np.arange(self.num_experts), home] = -np.inf
        return move, swap


# ---- Mt-KaHyPar ------------------------------------------------------------------------------------------
_MTKAHYPAR = {}  # Mt-KaHyPar's thread pool is process-wide: initialised once, with one thread; contexts


def mtkahypar_available() -> bool:
    """Is the optional Mt-KaHyPar package importable?"""
    import importlib.util

    return importlib.util.find_spec("mtkahypar") is not None


def _mtkahypar():
    try:
        import mtkahypar
    except ImportError as error:
        raise ImportError("partitioner='mtkahypar' needs the optional Mt-KaHyPar package; install it with "
                          "`pip install mtkahypar` (or `pip install 'minimoe[partition]'`), or use "
                          "partitioner='fm'") from error
    if "initializer" not in _MTKAHYPAR:
        _MTKAHYPAR["initializer"] = mtkahypar.initialize(1, False)
    return mtkahypar, _MTKAHYPAR["initializer"]


def mtkahypar_input(graph: Hypergraph):
    """The hypergraph as Mt-KaHyPar takes it: (vertex weights, hyperedges, hyperedge weights, fixed blocks).

    Vertices ``0..E-1`` are the experts (weight = load, rounded); with known sources, vertex ``E + n`` is
    node ``n``'s source, fixed to block ``n`` and pinned to every hyperedge starting there (weight 1:
    Mt-KaHyPar 1.7 crashes on zero-weight fixed vertices). One-pin hyperedges are left out (never cut)."""
    num_experts, num_nodes = graph.num_experts, graph.num_nodes
    rows = graph.experts if graph.pin is None else np.column_stack([graph.experts, num_experts + graph.pin])
    if (graph.experts >= 0).all():  # every row has k pins (+ its source): one conversion for all
        pins = rows.tolist()
    else:
        pins = [row[row >= 0].tolist() for row in rows]
    keep = [i for i, p in enumerate(pins) if len(p) > 1]
    edge_weight = np.maximum(np.rint(graph.weight[keep]), 1).astype(np.int64).tolist()
    vertex_weight = np.rint(graph.load).astype(np.int64).tolist()
    fixed = [-1] * num_experts
    if graph.pin is not None:
        vertex_weight += [1] * num_nodes
        fixed += list(range(num_nodes))
    return vertex_weight, [pins[i] for i in keep], edge_weight, fixed


def partition_mtkahypar(graph: Hypergraph, max_node_load: float, seed: int = 0,
                        preset: str = DEFAULT_MTKAHYPAR_PRESET) -> np.ndarray:
    """home (E,) int64: Mt-KaHyPar's km1 partition of ``graph`` into ``graph.num_nodes`` blocks, on one thread.

    No block's load exceeds ``max_node_load`` where Mt-KaHyPar finds such a partition (a block may always
    hold its heaviest expert); known sources are fixed vertices (``mtkahypar_input``). The number of experts
    per node is not constrained here (the caller repairs it). Same ``seed``, same result with the
    ``deterministic*`` presets (the default), whatever the process partitioned before; the other presets,
    even on one thread, may return another partition for the same input on a later call in the same process.
    Raises ImportError saying how to install Mt-KaHyPar when it is missing, ValueError for an unknown preset."""
    if preset not in MTKAHYPAR_PRESETS:
        raise ValueError(f"mtkahypar preset must be one of {list(MTKAHYPAR_PRESETS)}, got {preset!r}")
    mtkahypar, initializer = _mtkahypar()
    vertex_weight, edges, edge_weight, fixed = mtkahypar_input(graph)
    num_nodes = graph.num_nodes
    mtkahypar.set_seed(int(seed))
    if preset not in _MTKAHYPAR:  # one context per preset, reset below for every call (building one takes ms)
        _MTKAHYPAR[preset] = initializer.context_from_preset(getattr(mtkahypar.PresetType, preset.upper()))
    context = _MTKAHYPAR[preset]
    context.set_partitioning_parameters(num_nodes, 0.03, mtkahypar.Objective.KM1)  # epsilon: overridden below
    context.logging = False
    limit = int(np.ceil(max(max_node_load, graph.load.max(initial=0), graph.load.sum() / num_nodes)))
    context.set_individual_target_block_weights([limit + int(graph.pin is not None)] * num_nodes)
    hypergraph = initializer.create_hypergraph(context, len(vertex_weight), len(edges), edges, vertex_weight,
                                               edge_weight)
    if graph.pin is not None:
        hypergraph.add_fixed_vertices(fixed, num_nodes)
    block = np.asarray(hypergraph.partition(context).get_partition(), dtype=np.int64)
    return block[:graph.num_experts]
