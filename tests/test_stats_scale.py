"""The coordinator's take-in path for thousands of devices' answers (issue 24): safetensors layouts checked
once per distinct header (``wire.unpack_tensors``), JSON headers parsed without per-integer hooks when no
integer can be too long (``wire.load_json``), BatchNorm statistics checked and folded as whole vectors
(``evaluation.BnStats``) and evaluation tensor names split once per name list (``session.split_names``).
Every fast path is compared with a naive reference written here, and every check it must keep is attacked."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from nefl_edge.coordinator.session import split_names
from nefl_edge.core import wire
from nefl_edge.core.evaluation import MAX_STATS_BATCHES, BnStats
from nefl_edge.core.wire import ProtocolError, load_json, pack_tensors, unpack_tensors

NUMPY = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "I8": "i1", "U8": "u1", "I32": "<i4", "I64": "<i8"}


def naive_unpack(blob: bytes) -> dict[str, np.ndarray]:
    """safetensors read the obvious way: the header by json.loads, one copy per tensor."""
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])
    data = blob[8 + size :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[name] = np.frombuffer(data[begin:end], NUMPY[info["dtype"]]).reshape(info["shape"]).copy()
    return out


def blob(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def random_tensors(rng: np.random.Generator, mixed: bool) -> dict[str, np.ndarray]:
    dtypes = [np.float32, np.float16, np.int8, np.float64, np.uint8] if mixed else [np.float32]
    out = {}
    for i in range(int(rng.integers(1, 12))):
        shape = tuple(int(d) for d in rng.integers(0, 5, size=int(rng.integers(0, 4))))
        out[f"layer{i}.w"] = (rng.normal(size=shape) * 10).astype(dtypes[i % len(dtypes)])
    return out


@pytest.mark.parametrize("mixed", [False, True])
def test_unpack_tensors_reads_what_a_naive_reader_reads_first_time_and_from_the_cache(mixed: bool) -> None:
    rng = np.random.default_rng(24)
    for trial in range(40):
        tensors = random_tensors(rng, mixed)
        body = pack_tensors(tensors, keep_dtype=True)
        want = naive_unpack(body)
        for attempt in ("parsed", "cached"):
            got = unpack_tensors(body)
            assert got.keys() == want.keys(), f"trial {trial} ({attempt}): names {sorted(got)} != {sorted(want)}"
            for name in want:
                assert got[name].dtype == want[name].dtype, f"trial {trial} ({attempt}): dtype of {name}"
                assert got[name].shape == want[name].shape, f"trial {trial} ({attempt}): shape of {name}"
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"trial {trial} ({attempt}): {name}")
                assert not got[name].flags.writeable, f"trial {trial} ({attempt}): {name} is writable"


def test_a_cached_layout_admits_only_the_data_length_it_was_checked_with() -> None:
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    body = pack_tensors(tensors)
    unpack_tensors(body)  # cached now
    for bad, what in ((body[:-4], "shorter"), (body + b"\0" * 4, "longer"), (body + b"\0" * 8, "longer by 8")):
        with pytest.raises(ProtocolError, match=r"cover|does not match") as caught:
            unpack_tensors(bad)
        assert caught.value.reason == "tensors", f"a body {what} than its header says: {caught.value.reason}"


def test_a_header_that_differs_from_a_cached_one_is_checked_in_full() -> None:
    data = np.arange(8, dtype=np.float32).tobytes()
    good = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
    }
    np.testing.assert_array_equal(unpack_tensors(blob(good, data))["b"], [4, 5, 6, 7])
    hostile = [
        ({**good, "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "start where"),  # overlap
        ({**good, "b": {"dtype": "F32", "shape": [5], "data_offsets": [16, 32]}}, "does not match"),
        ({**good, "b": {"dtype": "F32", "shape": [-4], "data_offsets": [16, 32]}}, "invalid shape"),
        ({**good, "b": {"dtype": "PICKLE", "shape": [4], "data_offsets": [16, 32]}}, "unsupported dtype"),
        ({**good, "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32], "x": 1}}, "other keys"),
        ({"a": good["a"]}, "cover"),
    ]
    for header, why in hostile:
        with pytest.raises(ProtocolError, match=why):
            unpack_tensors(blob(header, data))
    # a 41-digit integer in a header is refused even though every other header skips the integer hook
    raw = json.dumps(good).replace("[0, 16]", "[0, 16" + "0" * 40 + "]").encode()
    with pytest.raises(ProtocolError, match="integer of 42 digits"):
        unpack_tensors(struct.pack("<Q", len(raw)) + raw + data)


def test_the_layout_cache_stays_bounded_under_a_flood_of_distinct_headers() -> None:
    big_name = "x" * 400
    for i in range(3 * wire.MAX_CACHED_LAYOUTS):
        unpack_tensors(pack_tensors({f"t{i}": np.zeros(1, np.float32)}))
    assert len(wire._layouts) <= wire.MAX_CACHED_LAYOUTS, f"{len(wire._layouts)} layouts cached"
    wire._layouts.clear()
    many = {f"{big_name}{i}": np.zeros(1, np.float32) for i in range(wire.MAX_CACHED_HEADER // 400 + 1)}
    assert len(unpack_tensors(pack_tensors(many))) == len(many)
    assert not wire._layouts, "a header above MAX_CACHED_HEADER was cached"


@pytest.mark.parametrize(
    ("text", "depth", "accepted"),
    [
        ('{"a": ' + "9" * 40 + "}", 16, True),
        ('{"a": -' + "9" * 40 + "}", 16, True),
        ('{"a": ' + "9" * 41 + "}", 16, False),
        ('{"a": 1, "b": [' + "9" * 41 + "]}", 16, False),
        ('{"' + "9" * 60 + '": 1}', 16, True),  # digits in a string are no integer
        ('{"a": 1.5e3, "b": "' + "1" * 50 + '"}', 16, True),
        ("[" * 16 + "]" * 16, 16, True),
        ("[" * 17 + "]" * 17, 16, False),
        ('{"a": [[1]]}', 3, True),
        ('{"a": [[[1]]]}', 3, False),
        ('{"a": "[[[[["}', 1, True),  # brackets in a string do not nest
        ('{"a": 1, "a": 2}', 16, False),
        ('{"a": 1e999}', 16, False),
        ('{"a": NaN}', 16, False),
    ],
)
def test_load_json_keeps_every_bound_on_its_fast_paths(text: str, depth: int, accepted: bool) -> None:
    if accepted:
        assert load_json(text.encode(), "h", "r", max_depth=depth) == json.loads(text), f"{text[:40]} refused"
    else:
        with pytest.raises(ProtocolError):
            load_json(text.encode(), "h", "r", max_depth=depth)


CHANNELS = {"stem.bn": 16, "layer1.0.bn1": 16, "layer1.0.bn2": 16, "layer2.0.bn1": 32, "layer2.0.bn2": 32, "head.bn": 3}


def device_tensors(rng: np.random.Generator, channels: dict[str, int], batches: int) -> dict[str, np.ndarray]:
    out = {}
    for prefix, size in channels.items():
        out[f"{prefix}.mean_sum"] = (rng.normal(size=size) * batches).astype(np.float32)
        out[f"{prefix}.var_sum"] = (rng.random(size) * batches).astype(np.float32)
    return out


def naive_running(parts: list[tuple[dict[str, np.ndarray], int]], channels: dict[str, int]) -> dict[str, np.ndarray]:
    """Per layer: the float64 sum over devices, in order, divided by the total batch count."""
    total = sum(b for _, b in parts)
    out = {}
    for prefix, size in channels.items():
        for suffix, key in ((".running_mean", ".mean_sum"), (".running_var", ".var_sum")):
            acc = np.zeros(size, np.float64)
            for tensors, _ in parts:
                acc = acc + tensors[prefix + key].astype(np.float64)
            out[prefix + suffix] = (acc / total).astype(np.float32)
    return out


def test_statistics_folded_as_vectors_equal_the_naive_per_layer_sums() -> None:
    rng = np.random.default_rng(7)
    parts = [(device_tensors(rng, CHANNELS, int(b)), int(b)) for b in rng.integers(1, 20, size=300)]
    total = BnStats()
    for tensors, batches in parts:
        body = pack_tensors(tensors)  # through the wire, as the coordinator reads them
        total.add(BnStats.from_tensors(unpack_tensors(body), batches, dict(CHANNELS)))
    want = naive_running(parts, CHANNELS)
    got = total.running()
    assert total.batches == sum(b for _, b in parts), "batch count"
    assert got.keys() == want.keys(), f"layers {sorted(got)}"
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} differs from the naive sum")


def test_vector_and_per_layer_statistics_mix_in_any_order() -> None:
    rng = np.random.default_rng(8)
    parts = [(device_tensors(rng, CHANNELS, 5), 5) for _ in range(6)]
    flat = [BnStats.from_tensors(t, b, CHANNELS) for t, b in parts]

    def layers(t: dict[str, np.ndarray], suffix: str) -> dict[str, np.ndarray]:
        return {p: t[p + suffix].astype(np.float64) for p in CHANNELS}

    by_layer = [BnStats(layers(t, ".mean_sum"), layers(t, ".var_sum"), b) for t, b in parts]
    want = naive_running(parts, CHANNELS)
    for order in (
        [flat[0], by_layer[1], flat[2], flat[3], by_layer[4], flat[5]],
        by_layer[:3] + flat[3:],
        flat[:3] + by_layer[3:],
    ):
        total = BnStats()
        for part in order:
            total.add(part)
        for name, value in total.running().items():
            np.testing.assert_allclose(value, want[name], rtol=1e-6, err_msg=f"{name} in a mixed fold")
    # a caller that changes a layer after reading the dicts changes what is folded
    total = BnStats()
    total.add(flat[0])
    total.mean_sum["stem.bn"] = total.mean_sum["stem.bn"] + 5.0
    total.add(flat[1])
    expected = (parts[0][0]["stem.bn.mean_sum"].astype(np.float64) + 5.0 + parts[1][0]["stem.bn.mean_sum"]) / 10
    np.testing.assert_allclose(total.running()["stem.bn.running_mean"], expected.astype(np.float32), rtol=1e-6)


def test_a_device_that_differs_in_layout_is_folded_layer_by_layer() -> None:
    rng = np.random.default_rng(9)
    small = {"stem.bn": 16, "head.bn": 3}
    a, b = device_tensors(rng, CHANNELS, 4), device_tensors(rng, small, 4)
    total = BnStats()
    total.add(BnStats.from_tensors(a, 4, CHANNELS))
    total.add(BnStats.from_tensors(b, 4, small))
    want = (a["head.bn.var_sum"].astype(np.float64) + b["head.bn.var_sum"]) / 8
    np.testing.assert_allclose(total.running()["head.bn.running_var"], want.astype(np.float32), rtol=1e-6)
    assert set(total.mean_sum) == set(CHANNELS), "a layer only one device has was lost"


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda t: t["layer2.0.bn1.mean_sum"].__setitem__(3, np.nan), "layer2.0.bn1.mean_sum holds NaN or Inf"),
        (lambda t: t["head.bn.var_sum"].__setitem__(0, np.inf), "head.bn.var_sum holds NaN or Inf"),
        (lambda t: t["layer1.0.bn2.var_sum"].__setitem__(15, -1e-3), "layer1.0.bn2.var_sum holds a negative"),
        (
            lambda t: t.update({"stem.bn.mean_sum": t["stem.bn.mean_sum"].astype(np.float64)}),
            "stem.bn.mean_sum: float64",
        ),
        (lambda t: t.update({"head.bn.var_sum": np.ones(4, np.float32)}), r"head.bn.var_sum: float32 \(4,\)"),
        (lambda t: t.update({"head.bn.var_sum": np.ones((3, 1), np.float32)}), r"head.bn.var_sum: float32 \(3, 1\)"),
        (lambda t: t.pop("layer2.0.bn2.var_sum"), "missing"),
        (lambda t: t.update({"extra.bn.mean_sum": np.ones(3, np.float32)}), "unexpected"),
    ],
)
def test_statistics_that_fail_a_check_are_refused_naming_the_tensor(spoil, message: str) -> None:  # type: ignore[no-untyped-def]
    tensors = {k: v.copy() for k, v in device_tensors(np.random.default_rng(3), CHANNELS, 3).items()}
    BnStats.from_tensors(tensors, 3, CHANNELS)  # the layout is known to the fast path before it is attacked
    spoil(tensors)
    with pytest.raises(ValueError, match=message):
        BnStats.from_tensors(tensors, 3, CHANNELS)


@pytest.mark.parametrize("batches", [0, -1, MAX_STATS_BATCHES + 1])
def test_a_batch_count_out_of_range_is_refused(batches: int) -> None:
    with pytest.raises(ValueError, match="batch count"):
        BnStats.from_tensors(device_tensors(np.random.default_rng(4), CHANNELS, 3), batches, CHANNELS)


def test_split_names_reads_submodel_prefixes_and_names_the_first_bad_one() -> None:
    names = ("0/stem.bn.mean_sum", "0/stem.bn.var_sum", "3/head.bn.mean_sum")
    for attempt in ("parsed", "cached"):
        split, submodels, wrong = split_names(names)
        assert split == tuple((n, int(n[0]), n[2:]) for n in names), f"{attempt}: {split}"
        assert submodels == {0, 3} and wrong == "", attempt
    for bad in ("x/stem.bn.mean_sum", "0/", "stem.bn.mean_sum", "\u00b2/stem.bn.mean_sum", "-1/a"):
        assert split_names(("0/a", bad))[2] == bad, f"{bad!r} was taken as a submodel's tensor"
    long = tuple(f"1/t{i}" for i in range(2000))  # beyond what is cached: the same answer
    split, submodels, wrong = split_names(long)
    assert len(split) == 2000 and submodels == {1} and wrong == ""


def test_message_ids_are_unique_well_formed_and_new_in_a_forked_child() -> None:
    import os

    ids = [wire.next_message_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids), "a message id repeated"
    assert all(wire._MSG_ID.fullmatch(i) for i in ids), (
        f"malformed id {next(i for i in ids if not wire._MSG_ID.fullmatch(i))}"
    )
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave at once
        os.write(write, wire.next_message_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    assert child[:16] != ids[0][:16], f"a forked child kept its parent's id prefix {child[:16]}"


def test_an_encoded_header_is_the_message_plus_its_body_size() -> None:
    from nefl_edge.core.schemas import EvalTask

    task = EvalTask(
        run="r", node="n1", task_id="t", round=3, submodels=[0, 2], weights_sha256=["0" * 64] * 2,
        evaluate=True, bn_stats=True, deadline_s=60,
    )  # fmt: skip
    body = pack_tensors({"w": np.ones(3, np.float32)})
    encoded = wire.encode(task, body)
    message, got = wire.decode(encoded)
    assert got == body, "the body did not come back"
    assert message.sent_at > 0, "no sent_at was stamped on a message without one"
    assert message == task.model_copy(update={"sent_at": message.sent_at}), f"{message} != {task}"
    (size,) = struct.unpack(">I", encoded[4:8])
    header = json.loads(encoded[8 : 8 + size])
    assert header["body_size"] == len(body) and list(header)[-1] == "body_size", header
    stamped = task.model_copy(update={"sent_at": 12.5})
    assert wire.decode(wire.encode(stamped))[0].sent_at == 12.5, "a given sent_at was replaced"


def test_the_statistics_profile_of_bench_coordinator_runs_every_stage() -> None:
    from bench.coordinator import statistics_profile

    got = statistics_profile(devices=20, repeats=1)
    stages = ("tasks", "receive", "answer", "read", "fold")
    assert all(got[s] > 0 for s in stages), f"a stage took no time: {got}"
    assert got["total"] == pytest.approx(sum(got[s] for s in stages)), got
    assert got["layers"] >= 5, f"resnet-small's largest submodel has {got['layers']} BatchNorm layers"


def test_an_open_session_lowers_the_switch_interval_and_close_restores_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sys

    from nefl_edge.coordinator.session import SWITCH_INTERVAL_S, CoordinatorSession
    from nefl_edge.core.link import MemoryBroker, MemoryLink
    from tests.test_session import RUN, extract, manifest

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.004)
        session = CoordinatorSession(MemoryLink(MemoryBroker(), RUN), RUN, manifest(tmp_path), tmp_path, 5.0, extract)  # type: ignore[arg-type]
        session.open()
        assert sys.getswitchinterval() == SWITCH_INTERVAL_S, f"open: {sys.getswitchinterval()}"
        session.close("done")
        assert sys.getswitchinterval() == pytest.approx(0.004), f"close did not restore it: {sys.getswitchinterval()}"
        sys.setswitchinterval(0.0001)  # lower already: left alone
        session = CoordinatorSession(MemoryLink(MemoryBroker(), RUN), RUN, manifest(tmp_path), tmp_path, 5.0, extract)  # type: ignore[arg-type]
        session.open()
        session.close("done")
        assert sys.getswitchinterval() == pytest.approx(0.0001), (
            f"a lower interval was changed: {sys.getswitchinterval()}"
        )
    finally:
        sys.setswitchinterval(before)


# --- statistics carried by a training task (Task.bn_stats) -----------------------------------------------------


def carried_setup(bn_stats: bool = True) -> tuple[object, dict[str, object], object]:
    """An ``Answers`` with one pending training task of round 3, submodel 1 (asking for statistics over at most
    4 batches when ``bn_stats``), and a function making an ``evaluation`` item for it."""
    from nefl_edge.coordinator.grid import Instruction
    from nefl_edge.coordinator.session import Answers, train_tasks
    from nefl_edge.core.schemas import BnCount, Evaluation, TrainConfig
    from nefl_edge.core.wire import Topics

    topics = Topics("r")
    tasks = train_tasks("r", 3, [Instruction("d1", 1, TrainConfig())], {1: "a" * 64}, 30.0, bn_stats, 4)
    pending: dict[str, object] = dict(tasks)

    def item(**change: object) -> tuple[str, Evaluation, bytes]:
        prefix = change.pop("prefix", 1)
        fields: dict[str, object] = {"run": "r", "node": "d1", "task_id": tasks["d1"].task_id, "round": 3}
        fields["bn"] = [BnCount(submodel=1, batches=4)]
        fields.update(change)
        sums = {f"{prefix}/bn.mean_sum": np.zeros(2, np.float32), f"{prefix}/bn.var_sum": np.ones(2, np.float32)}
        body = pack_tensors(sums)
        return topics.node("d1", "update"), Evaluation(**fields), body  # type: ignore[arg-type]

    return Answers(), pending, item


def test_statistics_carried_by_a_task_are_bound_to_that_task_round_and_submodel() -> None:
    from nefl_edge.core.schemas import BnCount, SubmodelEval

    answers, pending, item = carried_setup()
    cases = {
        "another task id": item(task_id="f" * 16),
        "another round": item(round=2),
        "another submodel": item(bn=[BnCount(submodel=2, batches=4)], prefix=2),
        "more batches than asked": item(bn=[BnCount(submodel=1, batches=5)]),
        "results nobody asked for": item(results=[SubmodelEval(submodel=1, loss=1.0, correct=1, count=2)]),
        "tensors of another submodel": item(prefix=0),
    }
    for what, bad in cases.items():
        fresh, still, _ = carried_setup()
        outcome = fresh.update(3, bad, still, 0.0)  # type: ignore[attr-defined]
        refused = outcome is None or outcome.status == "rejected"
        assert refused, f"statistics with {what} were taken: {outcome}"
        assert "d1" in still, f"statistics with {what} resolved the training task"
    good = answers.update(3, item(), pending, 0.0)  # type: ignore[attr-defined]
    assert good is not None and good.status == "evaluated", f"the task's own statistics were refused: {good}"
    assert good.bn_batches == {1: 4} and set(good.bn_tensors[1]) == {"bn.mean_sum", "bn.var_sum"}, good
    assert "d1" in pending, "the statistics resolved the training task: its update would be refused"
    again = answers.update(3, item(), pending, 0.0)  # type: ignore[attr-defined]
    assert again is None and answers.rejections["duplicate"] == 1, f"a second copy was taken: {again}"


def test_statistics_are_refused_for_a_task_that_did_not_ask_or_after_its_update() -> None:
    from nefl_edge.core.schemas import Metrics, Update

    answers, pending, item = carried_setup(bn_stats=False)
    assert answers.update(3, item(), pending, 0.0) is None, "statistics taken for a task that did not ask"  # type: ignore[attr-defined]
    answers, pending, item = carried_setup()
    stream, evaluation, _ = item()
    metrics = Metrics(loss_first=1.0, loss_last=1.0, accuracy=0.5, steps=1, seconds=1.0)
    update = Update(
        run="r", node="d1", task_id=evaluation.task_id, round=3, submodel=1, num_samples=10, metrics=metrics
    )
    body = pack_tensors({"w": np.zeros(1, np.float32)})
    done = answers.update(3, (stream, update, body), pending, 0.0)  # type: ignore[attr-defined]
    assert done is not None and done.status == "updated" and "d1" not in pending, done
    assert answers.update(3, item(), pending, 0.0) is None, "statistics taken after the task's update"  # type: ignore[attr-defined]


# --- the coordinator's inbox when full (core.link.Inbox) ----------------------------------------------------------


class NaiveInbox:
    """The inbox's rule written the obvious way (the implementation before issue 24's third pass): a list in
    arrival order; when full, scan every sender for the heaviest unfavoured one (first found wins a tie) and drop
    its oldest message."""

    def __init__(self, maxsize: int, max_bytes: int) -> None:
        self.maxsize, self.max_bytes = maxsize, max_bytes
        self.items: list[tuple[str, int]] = []
        self.since: dict[str, int] = {}  # when each waiting sender started waiting: the scan's dict order
        self.clock = 0

    def held(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for sender, size in sorted(self.items, key=lambda i: self.since[i[0]]):
            entry = out.setdefault(sender, [0, 0])
            entry[0] += 1
            entry[1] += size
        return out

    def take(self, index: int = 0) -> tuple[str, int]:
        item = self.items.pop(index)
        if all(s != item[0] for s, _ in self.items):
            del self.since[item[0]]
        return item

    def full(self, size: int) -> tuple[bool, bool]:
        total = sum(s for _, s in self.items)
        if total and total + size > self.max_bytes:
            return True, True
        return len(self.items) >= self.maxsize, False

    def offer(self, sender: str, size: int, favoured) -> bool:  # type: ignore[no-untyped-def]
        full, by_bytes = self.full(size)
        while full:
            held = self.held()
            best, most = None, (0, 0)
            for s, (count, nbytes) in held.items():
                weight = (nbytes, count) if by_bytes else (count, nbytes)
                if weight > most and not favoured(s):
                    best, most = s, weight
            mine = held.get(sender, [0, 0])
            if best is None or best == sender:
                return False
            if not favoured(sender) and (mine[1], mine[0]) >= (held[best][1], held[best][0]):
                return False
            self.take(next(i for i, item in enumerate(self.items) if item[0] == best))
            full, by_bytes = self.full(size)
        if sender not in self.since:
            self.clock += 1
            self.since[sender] = self.clock
        self.items.append((sender, size))
        return True


def inbound(sender: str, size: int) -> tuple[str, object, bytes]:
    from nefl_edge.core.wire import Topics

    return Topics("r").node(sender, "status"), None, b"x" * size


@pytest.mark.parametrize("seed", range(6))
def test_the_full_inbox_evicts_what_the_naive_scan_evicts(seed: int) -> None:
    from nefl_edge.core.link import Inbox
    from nefl_edge.core.wire import Topics

    rng = np.random.default_rng(seed)
    senders = [f"d{i}" for i in range(int(rng.integers(3, 40)))]
    lucky = set(rng.choice(senders, size=len(senders) // 3, replace=False))
    favoured = (lambda s: s.removeprefix("nefl/r/node/") in lucky) if seed % 2 else None
    maxsize, max_bytes = int(rng.integers(2, 30)), int(rng.integers(50, 2000))
    inbox, naive = Inbox(maxsize, max_bytes), NaiveInbox(maxsize, max_bytes)
    for step in range(1500):
        if rng.random() < 0.3 and naive.items:
            got = inbox.get_nowait()
            want = naive.take()
            assert (Topics.sender_of(got[0]), len(got[2])) == want, f"step {step}: got {got[0]} instead of {want}"
            continue
        sender, size = str(rng.choice(senders)), int(rng.integers(0, 120))
        key = Topics.sender_of(inbound(sender, size)[0])
        took = inbox.offer(inbound(sender, size), favoured) is None  # type: ignore[arg-type]
        wanted = naive.offer(key, size, favoured or (lambda s: False))
        assert took == wanted, f"step {step}: offer of {size} bytes from {sender}: {took} != naive {wanted}"
        assert inbox.qsize() == len(naive.items) and inbox.bytes == sum(s for _, s in naive.items), f"step {step}"
        assert inbox.held == naive.held(), f"step {step}: held {inbox.held} != {naive.held()}"


def test_a_full_inbox_of_favoured_senders_asks_about_few_of_them_per_offer() -> None:
    # 10,000 devices with a pending task each hold one status in a full inbox; every further status is dropped
    # (nobody may be evicted). The scan asked the predicate 10,000 times per offer; the heap asks it a few times.
    from nefl_edge.core.link import Inbox

    calls = 0

    def favoured(sender: str) -> bool:
        nonlocal calls
        calls += 1
        return True

    inbox = Inbox(10_000, 1 << 30)
    for i in range(10_000):
        assert inbox.offer(inbound(f"d{i}", 10), favoured) is None  # type: ignore[arg-type]
    calls = 0
    refused = [inbox.offer(inbound(f"d{i}", 10), favoured) for i in range(1000)]  # type: ignore[arg-type]
    assert all(r is not None for r in refused), "a favoured sender's message was evicted"
    assert calls <= 3 * 1000, f"{calls} favour checks for 1,000 offers to a full inbox of 10,000 senders"
