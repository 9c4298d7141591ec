"""Robust NeFedAvg (core/robust.py) against a naive reference written here: a loop over elements and the
clients that cover each of them; robust BatchNorm statistics and federated evaluation; strikes with decay and
the cover rule for devices that dropped tasks."""

from __future__ import annotations

import numpy as np
import pytest

from nefl_edge.coordinator.assignment import ClientInfo, assign, capacity
from nefl_edge.coordinator.evaluation import federated_summary, robust_bn_parts
from nefl_edge.coordinator.screening import Quarantine, SpeedEvidence
from nefl_edge.coordinator.strategies import get_strategy
from nefl_edge.core.evaluation import BnStats, EvalResult
from nefl_edge.core.nefedavg import NeFedAvg
from nefl_edge.core.nested import GlobalState, Tensors, extract, init_global_state, prefix_slice
from nefl_edge.core.robust import (
    ClientUpdate,
    RobustOptions,
    _cells,
    _leave_one_out_medians,
    _merge_exchange,
    _sorted_rows,
    disagreeing,
    robust_aggregate,
    trimmed_mean,
)
from nefl_edge.core.schemas import DeviceProfile, TrainConfig
from nefl_edge.core.specs import ModelConfig, SubmodelSpec, mflops, param_layout


def _updates(state: GlobalState, subs: list[int], seed: int = 1, scale: float = 0.01) -> list[tuple[int, Tensors, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for i, k in enumerate(subs):
        sent = extract(state, k)
        noise = {
            n: (v + rng.standard_normal(v.shape) * scale * (1 + i % 3)).astype(np.float32) for n, v in sent.items()
        }
        out.append((k, noise, int(rng.integers(50, 400))))
    return out


def _naive_norm(delta: dict[str, np.ndarray], names: list[str]) -> float:
    return float(np.sqrt(sum(float(x) ** 2 for n in names for x in delta[n].reshape(-1))))


def _naive_trimmed(values: list[float], weights: list[float], trim: float) -> float:
    pairs = sorted(zip(values, weights), key=lambda p: p[0])
    c = len(pairs)
    if c >= 3 and trim > 0:
        b = max(1, int(np.floor(trim * c)))
        pairs = pairs[b : c - b]
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


def _naive(state: GlobalState, updates: list[tuple[int, Tensors, int]], opts: RobustOptions, sample: int) -> dict:
    """Clipping and trimmed mean element by element (agreement off: ``opts.agree = -1``); returns
    ``{(name, index): value}`` for every element of small tensors and ``sample`` random ones of the rest."""
    layouts = [param_layout(state.config, s) for s in state.specs]
    sent = [extract(state, k) for k, _, _ in updates]
    deltas = [{n: t[n].astype(np.float64) - sent[i][n] for n in t} for i, (_, t, _) in enumerate(updates)]
    for part in ("consistent", "inconsistent"):
        groups = [
            [n for n, info in layouts[k].items() if info.kind == part and "running_" not in n] for k, _, _ in updates
        ]
        rel = [_naive_norm(deltas[i], g) / _naive_norm(sent[i], g) for i, g in enumerate(groups)]
        for i, (k, _, _) in enumerate(updates):
            same = [j for j, (kj, _, _) in enumerate(updates) if kj == k]
            peers = same if len(same) >= 3 else list(range(len(updates)))
            limit = opts.clip * float(np.median([rel[j] for j in peers])) * _naive_norm(sent[i], groups[i])
            norm = _naive_norm(deltas[i], groups[i])
            if norm > limit:
                for n in groups[i]:
                    deltas[i][n] = deltas[i][n] * (limit / norm)
    raw = [float(n) for _, _, n in updates]
    cap = opts.max_weight * float(np.median(raw))
    weights = [min(w, cap) for w in raw]
    rng = np.random.default_rng(0)
    expected: dict = {}
    for name, old in state.consistent.items():
        indices = list(np.ndindex(old.shape))
        if len(indices) > sample:
            indices = [indices[j] for j in rng.choice(len(indices), sample, replace=False)]
        for e in indices:
            cover = [
                i
                for i, (k, _, _) in enumerate(updates)
                if name in layouts[k] and all(a < b for a, b in zip(e, layouts[k][name].shape))
            ]
            if cover:
                value = _naive_trimmed([deltas[i][name][e] for i in cover], [weights[i] for i in cover], opts.trim)
                expected[("global", name, e)] = old[e] + value
            else:
                expected[("global", name, e)] = old[e]
    for k in sorted({k for k, _, _ in updates}):
        mine = [i for i, (kk, _, _) in enumerate(updates) if kk == k]
        for name, info in layouts[k].items():
            if info.kind == "consistent":
                continue
            for e in np.ndindex(info.shape):
                value = _naive_trimmed([deltas[i][name][e] for i in mine], [weights[i] for i in mine], opts.trim)
                expected[(k, name, e)] = state.inconsistent[k][name][e] + value
    return expected


def _lookup(out: GlobalState, key: tuple) -> float:
    scope, name, e = key
    return float((out.consistent if scope == "global" else out.inconsistent[scope])[name][e])


@pytest.mark.parametrize(
    "subs",
    [[0, 0, 1, 1, 2, 4, 4], [4, 4, 4, 4, 4], [0, 1, 2, 3, 4], [1, 3]],
    ids=["mixed", "one-submodel", "one-per-submodel", "two-clients-fallback"],
)
def test_robust_nefedavg_matches_a_naive_element_by_element_reference(
    small_config: ModelConfig, small_specs: list[SubmodelSpec], subs: list[int]
) -> None:
    state = init_global_state(small_config, small_specs, {}, seed=3)
    updates = _updates(state, subs)
    updates[-1][1]["stem.conv.weight"] *= 50  # one update far larger than the rest: it is clipped
    opts = RobustOptions(trim=0.25, clip=1.5, agree=-1.0, max_weight=1.5)
    agg = NeFedAvg(state, "samples", robust=opts)
    for k, t, n in updates:
        agg.add(k, t, n)
    out = agg.result()
    expected = _naive(state, updates, opts, sample=300)
    worst = max(abs(_lookup(out, key) - value) for key, value in expected.items())
    assert worst < 2e-5, f"robust NeFedAvg differs from the naive reference by {worst}"
    if len(subs) >= 3:
        assert agg.robust_report.clipped, "the 50x update was not clipped"


def test_trimmed_mean_drops_the_extremes_and_falls_back_to_the_mean_with_two_clients() -> None:
    values = np.array([[1.0], [2.0], [3.0], [100.0]], np.float32)
    got = trimmed_mean(values, np.array([1.0, 1.0, 1.0, 1.0]), 0.25, 3)
    assert got[0] == pytest.approx(2.5), f"trimmed mean of 1,2,3,100 should be 2.5, got {got[0]}"
    two = trimmed_mean(values[:2], np.array([1.0, 3.0]), 0.25, 3)
    assert two[0] == pytest.approx(1.75), f"two clients: the weighted mean 1.75 expected, got {two[0]}"


def test_a_sign_flipped_scaled_update_is_left_out_and_the_result_stays_near_the_honest_one(
    small_config: ModelConfig, small_specs: list[SubmodelSpec]
) -> None:
    state = init_global_state(small_config, small_specs, {}, seed=4)
    rng = np.random.default_rng(9)
    direction = {n: rng.standard_normal(v.shape).astype(np.float32) * 0.01 for n, v in state.consistent.items()}
    honest = []
    for k in [0, 2, 4]:
        sent = extract(state, k)
        t = {n: v.copy() for n, v in sent.items()}
        for n in t:
            if n in direction:
                sl = tuple(slice(0, s) for s in t[n].shape)
                t[n] = t[n] + direction[n][sl] + rng.standard_normal(t[n].shape).astype(np.float32) * 0.003
        honest.append((k, t, 100))
    k, t, _ = honest[2]
    sent = extract(state, k)
    hostile = (k, {n: sent[n] - 5 * (t[n] - sent[n]) for n in t}, 10_000_000)  # w - 5 (trained - w)
    reference = NeFedAvg(state, "samples", robust=RobustOptions())
    for u in honest:
        reference.add(*u)
    clean = reference.result()
    for mode in ("exact", "robust"):
        agg = NeFedAvg(state, "samples", robust=RobustOptions() if mode == "robust" else None)
        for u in [*honest, hostile]:
            agg.add(*u, node=f"n{agg.updates}")
        got = agg.result()
        moved = max(float(np.abs(got.consistent[n] - clean.consistent[n]).max()) for n in clean.consistent)
        if mode == "robust":
            assert agg.robust_report.disagreeing == ["n3"], f"the hostile update was not left out: {agg.robust_report}"
            assert moved < 1e-6, f"robust result moved {moved} from the honest-only result"
        else:
            assert moved > 0.01, f"exact NeFedAvg should be owned by the hostile update (moved {moved})"


def test_one_client_cannot_take_more_than_its_capped_share_of_the_weight(
    small_config: ModelConfig, small_specs: list[SubmodelSpec]
) -> None:
    state = init_global_state(small_config, small_specs, {}, seed=5)
    updates = _updates(state, [0, 0])
    updates[1] = (0, updates[1][1], 10_000_000)
    agg = NeFedAvg(state, "samples", robust=RobustOptions(max_weight=2.0))
    for k, t, n in updates:
        agg.add(k, t, n)
    out = agg.result()
    name = "stem.conv.weight"
    sl = tuple(slice(0, s) for s in updates[0][1][name].shape)
    d0, d1 = (updates[i][1][name] - state.consistent[name][sl] for i in (0, 1))
    w0, w1 = updates[0][2], min(10_000_000, 2.0 * np.median([updates[0][2], 10_000_000]))
    expected = state.consistent[name][sl] + (w0 * d0 + w1 * d1) / (w0 + w1)
    np.testing.assert_allclose(out.consistent[name][sl], expected, atol=2e-6, err_msg="weight cap")
    assert agg.robust_report.capped == [], "two clients: the median is their mean, nobody is beyond 2x it"
    agg = NeFedAvg(state, "samples", robust=RobustOptions(max_weight=2.0))
    for k, t, n in [*_updates(state, [0, 0, 0], seed=2), updates[1]]:
        agg.add(k, t, n, node=f"c{agg.updates}")
    agg.result()
    assert agg.robust_report.capped == ["c3"], f"the 1e7-sample claim was not capped: {agg.robust_report}"


def _bn(mean: float, var: float, batches: int, channels: int = 4) -> BnStats:
    rng = np.random.default_rng(int(mean * 100 + var * 10 + batches))
    m = mean + rng.standard_normal(channels) * 0.01
    v = var * (1 + rng.random(channels) * 0.05)
    return BnStats({"stem.bn": m * batches}, {"stem.bn": v * batches}, batches)


@pytest.mark.parametrize("lie", ["mean+1e4", "var*1e-6"])
def test_robust_bn_statistics_leave_the_liar_out_and_combine_the_rest_exactly(lie: str) -> None:
    honest = [(f"d{i}", _bn(0.5, 2.0, 8)) for i in range(3)]
    liar = _bn(0.5 + 1e4, 2.0, 8) if lie == "mean+1e4" else _bn(0.5, 2.0 * 1e-6, 8)
    kept, rejected = robust_bn_parts([*honest, ("liar", liar)], max_weight=2.0)
    assert rejected == ["liar"], f"{lie}: rejected {rejected}"
    total = sum(p.mean_sum["stem.bn"] for _, p in honest) / sum(p.batches for _, p in honest)
    got = sum(p.mean_sum["stem.bn"] for p in kept) / sum(p.batches for p in kept)
    np.testing.assert_allclose(got, total, err_msg="the kept devices are not combined exactly")


def test_robust_bn_statistics_cap_a_claimed_batch_count() -> None:
    parts = [("a", _bn(0.5, 2.0, 8)), ("b", _bn(0.5, 2.0, 8)), ("big", _bn(0.5, 2.0, 800))]
    kept, rejected = robust_bn_parts(parts, max_weight=2.0)
    assert rejected == [] and [p.batches for p in kept] == [8, 8, 16], f"batches {[p.batches for p in kept]}"
    big = kept[2]
    np.testing.assert_allclose(big.mean_sum["stem.bn"] / big.batches, parts[2][1].mean_sum["stem.bn"] / 800)


def test_federated_accuracy_reports_its_spread_and_the_disagreeing_device() -> None:
    answers = [("a", EvalResult(10.0, 70, 100)), ("b", EvalResult(12.0, 66, 100)), ("c", EvalResult(9.0, 72, 100))]
    liar = ("liar", EvalResult(0.0, 1000, 1000))
    summary = federated_summary([*answers, liar], robust=True, max_weight=2.0)
    assert summary["disagree"] == ["liar"], f"disagreeing devices {summary['disagree']}"
    naive = sum(r.correct for _, r in answers) / sum(r.count for _, r in answers)
    assert summary["accuracy"] == pytest.approx(naive), "robust: the liar must not count"
    assert (summary["lowest"], summary["highest"]) == (0.66, 1.0), f"spread {summary}"
    plain = federated_summary([*answers, liar], robust=False)
    assert plain["accuracy"] == pytest.approx(1208 / 1300) and plain["disagree"] == ["liar"], f"exact sum {plain}"


def test_strikes_decay_and_drops_count() -> None:
    q = Quarantine(strikes=3, rounds=2)
    q.record("a", False, 1, dropped=True)
    q.record("a", False, 2)  # a good task halves the count
    q.record("a", False, 3, dropped=True)
    q.record("a", True, 4)
    assert not q.blocked("a", 5), "1 -> 0.5 -> 1.5 -> 2.5 strikes must not quarantine"
    q.record("a", False, 5, dropped=True)
    assert q.blocked("a", 6) and q.blocked("a", 7) and not q.blocked("a", 8), "3.5 strikes quarantine for 2 rounds"
    assert q.dropped_recently("a", 6) and not q.dropped_recently("a", 9), "recent drops are remembered 3 rounds"


def test_a_device_with_recent_drops_is_never_the_only_cover_of_a_submodel(
    small_config: ModelConfig,
) -> None:
    strategy = get_strategy("nefl-wd")
    _, plan = strategy.setup(small_config, (0.5, 1.0))
    caps = {"flaky": 0, "b": 1, "c": 1, "d": 1}
    out = assign(strategy, plan, caps, sorted(caps), cover=True)
    assert out["flaky"] == 0 and sorted(out.values()).count(0) == 1, f"baseline assignment {out}"
    out = assign(strategy, plan, caps, sorted(caps), cover=True, unreliable=frozenset({"flaky"}))
    covers = sorted(n for n, k in out.items() if k == 0)
    assert "flaky" in covers and len(covers) == 2, f"submodel 0 needs a reliable second device: {out}"
    assert 1 in out.values(), f"the large submodel lost its cover: {out}"


def test_a_declared_speed_that_answers_contradict_stops_setting_the_capacity(small_config: ModelConfig) -> None:
    strategy = get_strategy("nefl-wd")
    config, plan = strategy.setup(small_config, (0.2, 0.6, 1.0))
    train = TrainConfig(epochs=1, batch_size=32)
    profile = DeviceProfile(
        arch="x", system="y", python="3", cores=4, memory_mb=1, onnxruntime="1", backend="b",
        samples_per_s=1e9, probe_mflops=mflops(config, plan.specs[0]),
    )  # fmt: skip
    info = ClientInfo("liar", 2000, None, profile)
    deadline = 10.0
    assert capacity(info, "deadline", plan, config, train, deadline) == 2, "1e9 samples/s affords the largest"
    evidence = SpeedEvidence()
    big = mflops(config, plan.specs[2])
    why = evidence.observe("liar", profile, big, 2000, deadline, deadline, answered=False)
    assert why and "never answered" in why, f"an unanswered task must lower the trusted speed: {why}"
    trusted = evidence.profile("liar", profile)
    assert trusted is not None and trusted.samples_per_s is not None
    naive = 2000 / deadline * big / profile.probe_mflops / 2  # it did not train 2000 samples in 10 s
    assert trusted.samples_per_s == pytest.approx(naive), f"trusted {trusted.samples_per_s}, expected {naive}"
    after = capacity(ClientInfo("liar", 2000, None, trusted), "deadline", plan, config, train, deadline)
    assert after < 2, f"capacity {after} still from the declared speed"
    honest = evidence.observe("ok", profile, big, 2000, 1.0, deadline, answered=True)
    assert honest is None, "a short task is not judged (downloads and start-up dominate it)"
    slow = evidence.observe("ok", profile, big, 2000, 9.0, deadline, answered=True)
    assert slow and "delivered" in slow, "a long task far below the declared speed must be seen"


@pytest.mark.parametrize("clients", [3, 4, 7, 24])
def test_trimmed_mean_and_leave_one_out_medians_match_a_naive_loop(clients: int) -> None:
    rng = np.random.default_rng(clients)
    values = rng.standard_normal((clients, 40)).astype(np.float32)
    weights = rng.integers(1, 50, clients).astype(np.float64)
    got = trimmed_mean(values, weights, 0.25, 3)  # 24 clients: 6 per side, past the selection passes
    for e in range(values.shape[1]):
        naive = _naive_trimmed(list(values[:, e]), list(weights), 0.25)
        assert got[e] == pytest.approx(naive, rel=1e-5, abs=1e-6), f"{clients} clients, element {e}"
    medians = _leave_one_out_medians(values)
    for i in range(clients):
        naive_median = np.median(np.delete(values, i, axis=0), axis=0)
        np.testing.assert_allclose(medians[i], naive_median, rtol=1e-6, err_msg=f"leave-one-out median of {i}")


@pytest.mark.parametrize("n", range(1, 17))
def test_the_sorting_network_sorts_every_binary_input_hence_every_input(n: int) -> None:
    """The 0-1 principle (Knuth, TAOCP vol. 3, 5.3.4, Theorem Z): a comparator network that sorts all 2^n
    inputs of zeros and ones sorts every input; one column per binary input."""
    columns = np.arange(1 << n)
    binary = ((columns[None, :] >> np.arange(n)[:, None]) & 1).astype(np.float32)
    got = np.stack(_sorted_rows(binary))
    want = np.sort(binary, axis=0)
    assert np.array_equal(got, want), f"{len(_merge_exchange(n))} pairs do not sort {n} rows"
    b = max(1, n // 4)
    for ranks in {(b - 1, b, n - b - 1, n - b), (max(0, (n - 1) // 2 - 1), (n - 1) // 2, min(n - 1, (n + 1) // 2))}:
        ranks = tuple(sorted({r for r in ranks if 0 <= r < n}))
        picked = _sorted_rows(binary, ranks)
        for r in ranks:
            assert np.array_equal(picked[r], want[r]), f"the selection network for ranks {ranks} of {n} misses {r}"
    assert np.array_equal(binary, ((columns[None, :] >> np.arange(n)[:, None]) & 1)), "the input was changed"


def _naive_trimmed_ties(values: list[float], weights: list[float], b: int) -> float:
    """The trim rule with ties: the b smallest go by (value, client), the b largest by (-value, client), each
    side on its own; the weighted mean of the clients on neither side."""
    c = len(values)
    low = sorted(range(c), key=lambda i: (values[i], i))[:b]
    high = sorted(range(c), key=lambda i: (-values[i], i))[:b]
    kept = [i for i in range(c) if i not in low and i not in high]
    return sum(values[i] * weights[i] for i in kept) / sum(weights[i] for i in kept)


@pytest.mark.parametrize("clients", [3, 4, 5, 8, 9, 12, 19, 24, 70])  # 70: sorts, not the network
def test_trimmed_mean_with_tied_values_matches_a_naive_loop(clients: int) -> None:
    rng = np.random.default_rng(100 + clients)
    values = rng.integers(-2, 3, (clients, 300)).astype(np.float32)  # many ties, at the thresholds too
    values[:, :20] = 1.5  # every client equal
    weights = rng.integers(1, 50, clients).astype(np.float64)
    for trim in (0.25, 0.45):
        b = max(1, int(np.floor(trim * clients)))
        got = trimmed_mean(values, weights, trim, 3)
        for e in range(values.shape[1]):
            naive = _naive_trimmed_ties([float(v) for v in values[:, e]], list(weights), b)
            assert got[e] == pytest.approx(naive, rel=1e-6), f"{clients} clients, trim {trim}, element {e}"


def test_the_cells_tile_the_union_of_prefixes_once_each_with_one_covering_set() -> None:
    shapes = [(5, 3, 2), (2, 6, 2), (5, 6, 1), (1, 1, 2)]  # not nested: each is largest in some dimension
    seen = np.zeros((5, 6, 2), int)
    for box, corner in _cells(shapes):
        seen[box] += 1
        cover = {s for s in shapes if all(a >= b for a, b in zip(s, corner))}
        for e in np.ndindex(*(b.stop - b.start for b in box)):
            element = tuple(b.start + i for b, i in zip(box, e))
            mine = {s for s in shapes if all(x < a for x, a in zip(element, s))}
            assert mine == cover or not mine, f"element {element}: covered by {mine}, its box says {cover}"
    union = np.zeros_like(seen)
    for shape in shapes:
        union[tuple(slice(0, a) for a in shape)] = 1
    assert np.array_equal(np.minimum(seen, 1), seen), "an element lies in two boxes"
    assert np.array_equal(seen[union == 1], np.ones(int(union.sum()), int)), "an element of the union has no box"


def test_a_client_whose_delta_is_not_finite_is_left_out(
    small_config: ModelConfig, small_specs: list[SubmodelSpec]
) -> None:
    state = init_global_state(small_config, small_specs, {}, seed=6)
    updates = [ClientUpdate(k, t, float(n), f"c{i}") for i, (k, t, n) in enumerate(_updates(state, [0, 1, 1, 2, 4]))]
    name = next(n for n in updates[2].tensors if "running_" not in n)
    hostile = {**updates[2].tensors, name: np.full_like(updates[2].tensors[name], np.inf)}
    broken = ClientUpdate(updates[2].index, hostile, 1.0, "x")
    clean, _ = robust_aggregate(state, updates, RobustOptions())
    got, report = robust_aggregate(state, [*updates[:3], broken, *updates[3:]], RobustOptions())
    assert report.disagreeing[:1] == ["x"], f"the non-finite update was not left out: {report}"
    for key, value in got.flat().items():
        assert np.array_equal(value, clean.flat()[key]), f"{key}: the result is not the one without the client"


def _naive_hampel(scores: list[float], agree: float, z: float) -> list[int]:
    """The agreement step's rule written out: below ``agree`` and below median - z * 1.4826 * MAD."""
    n = len(scores)
    xs = sorted(scores)
    med = (xs[(n - 1) // 2] + xs[n // 2]) / 2
    devs = sorted(abs(x - med) for x in scores)
    mad = (devs[(n - 1) // 2] + devs[n // 2]) / 2
    bar = min(agree, med - z * 1.4826 * mad) if z > 0 else agree
    return [i for i, x in enumerate(scores) if x < bar]


@pytest.mark.parametrize("seed", range(8))
def test_the_agreement_rule_matches_a_naive_hampel_identifier(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = [float(v) for v in np.round(rng.normal(0.05, 0.06, int(rng.integers(3, 25))), 2)]  # ties: rounded
    if seed % 2:
        scores[int(rng.integers(len(scores)))] = -0.4  # a reversed update among them
    for agree, z in ((0.0, 3.0), (0.0, 0.0), (0.1, 2.5), (-1.0, 3.0), (1.0, 1.0)):
        got = disagreeing(scores, agree, z)
        assert got == _naive_hampel(scores, agree, z), f"agree {agree}, z {z}, scores {scores}: left out {got}"
    assert len(disagreeing(scores, 1.0, 0.5)) <= len(scores) // 2, "more than half below the median"


def test_honest_updates_that_barely_agree_are_kept_and_a_reversed_one_among_agreeing_ones_is_not(
    small_config: ModelConfig, small_specs: list[SubmodelSpec]
) -> None:
    """Late-round or non-IID honest updates: each shares a little of one direction (a share drawn per client,
    some below 0) under much independent noise, so their cosines with the median of the others sit near 0,
    some below it (the paper preset's honest cosines had a median of 0.03 by round 20). The plain rule
    ``cosine < 0`` leaves those out; the outlier rule keeps them all. Among updates that agree, a reversed
    scaled copy (``w - 5 (trained - w)``) is still left out."""
    state = init_global_state(small_config, small_specs, {}, seed=7)
    rng = np.random.default_rng(11)
    direction = {n: rng.standard_normal(v.shape).astype(np.float32) for n, v in state.consistent.items()}

    def trained(k: int, share: float) -> Tensors:
        out = {}
        for n, v in extract(state, k).items():
            change = rng.standard_normal(v.shape).astype(np.float32)
            if n in direction:
                change += np.float32(share) * direction[n][prefix_slice(v.shape)]
            out[n] = v + np.float32(0.01) * change
        return out

    subs = [0, 1, 2, 3, 4] * 2
    shares = 0.1 + 0.25 * rng.standard_normal(len(subs))
    weak = [ClientUpdate(k, trained(k, a), 100.0, f"c{i}") for i, (k, a) in enumerate(zip(subs, shares))]
    _, plain = robust_aggregate(state, weak, RobustOptions(agree_z=0.0))
    _, report = robust_aggregate(state, weak, RobustOptions())
    cosines = {n: round(c, 3) for n, c in report.cosine.items()}
    assert plain.disagreeing, f"the setting is too easy: cosine < 0 leaves no honest update out ({cosines})"
    assert report.disagreeing == [], f"honest updates left out: {report.disagreeing} (cosines {cosines})"

    agreeing = [ClientUpdate(k, trained(k, 1.0), 100.0, f"c{i}") for i, k in enumerate(subs[:6])]
    sent = extract(state, agreeing[0].index)
    reversed_ = {n: sent[n] - 5 * (t - sent[n]) for n, t in agreeing[0].tensors.items()}
    hostile = ClientUpdate(agreeing[0].index, reversed_, 100.0, "hostile")
    _, report = robust_aggregate(state, [*agreeing[1:], hostile], RobustOptions())
    assert report.disagreeing == ["hostile"], f"not exactly the reversed update left out: {report.cosine}"


def test_the_clipping_limit_is_computed_again_over_the_kept_updates_only(
    small_config: ModelConfig, small_specs: list[SubmodelSpec]
) -> None:
    """A small reversed update (a tenth of an honest one's length, pointing the other way) is left out by the
    agreement step; it must not pull down the median norm that clips the honest ones. Planted: four honest
    updates of one submodel at 1, 1.2, 3 and 3.2 times one length. With the left-out update in the median
    (0.1, 1, 1.2, 3, 3.2: 1.2) the limit 2 x 1.2 clips the two long ones; over the kept four (median 2.1)
    nothing is clipped. The result must be the naive reference's over the kept updates alone."""
    state = init_global_state(small_config, small_specs, {}, seed=8)
    rng = np.random.default_rng(12)
    k = len(small_specs) - 1
    sent = extract(state, k)
    direction = {n: rng.standard_normal(v.shape).astype(np.float32) for n, v in sent.items()}

    def trained(scale: float) -> Tensors:
        return {
            n: v + np.float32(0.002 * scale) * (direction[n] + 0.2 * rng.standard_normal(v.shape).astype(np.float32))
            for n, v in sent.items()
        }

    honest = [(k, trained(s), 100) for s in (1.0, 1.2, 3.0, 3.2)]
    hostile = (k, trained(-0.1), 100)
    everyone = [*honest, hostile]
    groups = [n for n, info in param_layout(state.config, small_specs[k]).items() if info.kind == "consistent"]
    relative = [
        _naive_norm({n: t[n] - sent[n] for n in groups}, groups) / _naive_norm(sent, groups) for _, t, _ in everyone
    ]
    opts = RobustOptions()
    old_limit = opts.clip * float(np.median(relative))
    new_limit = opts.clip * float(np.median(relative[:4]))
    assert any(r > old_limit for r in relative[:4]), f"the setting is too easy: the old limit clips nobody {relative}"
    assert all(r <= new_limit for r in relative[:4]), f"the kept updates' own limit clips {relative} at {new_limit}"

    got, report = robust_aggregate(
        state, [ClientUpdate(k, t, float(n), f"c{i}") for i, (k, t, n) in enumerate(everyone)], opts
    )
    assert report.disagreeing == ["c4"], f"not exactly the small reversed update left out: {report.cosine}"
    assert report.clipped == {}, f"honest updates clipped by a limit the left-out update set: {report.clipped}"
    expected = _naive(state, honest, opts, sample=300)
    worst = max(abs(_lookup(got, key) - value) for key, value in expected.items())
    assert worst < 2e-5, f"the result differs from the naive aggregation of the kept updates by {worst}"
