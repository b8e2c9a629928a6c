"""Tests for tunebal.checkpoint: Arrow IPC checkpoints with no pickle on the load path."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import random
import struct

import numpy as np
import pyarrow as pa
import pytest
import torch

from tunebal.checkpoint import (
    CHECKPOINT_FILENAME,
    FORMAT_VERSION,
    experiment_dataset,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from tunebal import sealed
from tunebal.errors import CheckpointError, TunebalError


# --------------------------------------------------------------------------- helpers


def assert_tree_equal(a, b, path="<root>"):
    """Exact structural equality: same types, same keys (and key types), bit-equal leaves."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} != {b.shape}"
        assert a.device == b.device, path
        # torch.equal treats nan != nan; compare the raw bytes instead for floats.
        if a.numel():
            assert torch.equal(
                a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8)
            ), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} != {list(b)}"
        for ka, kb in zip(a, b):
            assert type(ka) is type(kb), f"{path}: key {ka!r} type {type(ka)} != {type(kb)}"
            assert_tree_equal(a[ka], b[kb], f"{path}/{ka}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}/{i}")
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def make_model() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 5),
    )


def train_step(model, opt, x, y):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def write_sealed(table: pa.Table, dst) -> None:
    """Write ``table`` as an Arrow file and seal it with a fresh whole-file digest, as an
    attacker who knows the format would: this reaches the checks behind the digest."""
    ph = sealed.placeholder()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), sealed.DIGEST_KEY: ph.encode()})
    with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    sealed.seal(dst, ph)


def rewrite(src, dst, *, metadata=None, columns=None, drop_metadata=False, reseal=True):
    """Copy a checkpoint file, optionally replacing its metadata / some columns; by default
    the copy is resealed (a valid digest) so that the checks behind the digest are reached."""
    with pa.memory_map(str(src)) as f:
        table = pa.ipc.open_file(f).read_all()
    schema_md = table.schema.metadata
    if columns:
        for name, arr in columns.items():
            i = table.schema.get_field_index(name)
            table = table.set_column(i, pa.field(name, arr.type, nullable=False), arr)
    if drop_metadata:
        table = table.replace_schema_metadata(None)
    else:
        table = table.replace_schema_metadata(metadata if metadata is not None else schema_md)
    if reseal:
        write_sealed(table, dst)
        return dst
    with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return dst


def header_of(path) -> dict:
    with pa.memory_map(str(path)) as f:
        return json.loads(pa.ipc.open_file(f).schema.metadata[b"tunebal"])


@pytest.fixture
def one_thread():
    """Tiny CPU models run much faster (and no less exactly) on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def simple_ckpt(tmp_path):
    path = tmp_path / CHECKPOINT_FILENAME
    state = {
        "w": torch.arange(64, dtype=torch.float32).reshape(8, 8),
        "s": {0: torch.tensor([1, 2, 3])},
    }
    save_checkpoint(path, state, {"epoch": 1})
    return path, state


# --------------------------------------------------------------------------- round trips


def test_model_optimizer_scheduler_round_trip_and_resume_is_bit_identical(tmp_path, one_thread):
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    m_sgd = make_model()
    m_adam = copy.deepcopy(m_sgd)
    sgd = torch.optim.SGD(m_sgd.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    adam = torch.optim.Adam(m_adam.parameters(), lr=1e-3, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.StepLR(sgd, step_size=1, gamma=0.5)
    for _ in range(2):
        train_step(m_sgd, sgd, x, y)
        sched.step()
        train_step(m_adam, adam, x, y)

    state = {
        "model_sgd": m_sgd.state_dict(),
        "model_adam": m_adam.state_dict(),
        "sgd": sgd.state_dict(),
        "adam": adam.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": 2,
    }
    path = tmp_path / CHECKPOINT_FILENAME
    nbytes = save_checkpoint(path, state, {"epoch": 2, "config": {"lr": 0.1}})
    assert nbytes == path.stat().st_size > 0
    loaded, meta = load_checkpoint(path)
    assert meta == {"epoch": 2, "config": {"lr": 0.1}}

    # state_dicts are OrderedDicts; the checkpoint gives plain dicts with the same content.
    def plain(t):
        if isinstance(t, dict):
            return {k: plain(v) for k, v in t.items()}
        if isinstance(t, list):
            return [plain(v) for v in t]
        if isinstance(t, tuple):
            return tuple(plain(v) for v in t)
        return t
    assert_tree_equal(plain(state), loaded)

    # Spot checks on the parts that are easiest to get wrong.
    assert set(loaded["sgd"]["state"]) == {0, 1, 2, 3, 4, 5}
    assert all(type(k) is int for k in loaded["adam"]["state"])
    assert loaded["adam"]["param_groups"][0]["betas"] == (0.8, 0.99)
    assert type(loaded["adam"]["param_groups"][0]["betas"]) is tuple
    assert loaded["sgd"]["param_groups"][0]["nesterov"] is True
    nbt = loaded["model_sgd"]["1.num_batches_tracked"]
    assert nbt.dtype == torch.int64 and nbt.dim() == 0 and int(nbt) == 2
    assert loaded["scheduler"]["last_epoch"] == 2

    # Resume: fresh model/optimizers from the checkpoint take one more step; the result must be
    # bit-identical to the uninterrupted run.
    for key, cls, kwargs, orig_model, orig_opt in (
        ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4), m_sgd, sgd),
        ("adam", torch.optim.Adam, dict(lr=1e-3, betas=(0.8, 0.99)), m_adam, adam),
    ):
        model = make_model()
        model.load_state_dict(loaded[f"model_{key}"])
        opt = cls(model.parameters(), **kwargs)
        opt.load_state_dict(loaded[key])
        if key == "sgd":
            new_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            new_sched.load_state_dict(loaded["scheduler"])
            assert opt.param_groups[0]["lr"] == sgd.param_groups[0]["lr"] == 0.025
        train_step(orig_model, orig_opt, x, y)
        train_step(model, opt, x, y)
        for (n, a), b in zip(orig_model.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), f"{key}: {n} differs after resume"


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    torch.rand(3), np.random.rand(3), random.random()  # advance away from the seed point
    np.random.standard_normal()  # leaves a cached gaussian in the numpy state
    state = {
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
    }
    expected = (torch.rand(5), np.random.standard_normal(5), np.random.rand(5), [random.random() for _ in range(5)])
    path = tmp_path / CHECKPOINT_FILENAME
    save_checkpoint(path, state, {})

    torch.manual_seed(999), np.random.seed(999), random.seed(999)  # scramble
    loaded, _ = load_checkpoint(path)
    rng = loaded["rng"]
    assert rng["torch"].dtype == torch.uint8
    assert type(rng["numpy"]) is tuple and rng["numpy"][0] == "MT19937"
    assert rng["numpy"][1].dtype == np.uint32 and rng["numpy"][1].shape == (624,)
    assert type(rng["python"]) is tuple and type(rng["python"][1]) is tuple
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    got = (torch.rand(5), np.random.standard_normal(5), np.random.rand(5), [random.random() for _ in range(5)])
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1]) and np.array_equal(got[2], expected[2])
    assert got[3] == expected[3]


def test_dtypes_shapes_and_python_values_round_trip(tmp_path):
    param = torch.nn.Parameter(torch.randn(2, 3))
    state = {
        "bf16": torch.randn(4, 5).to(torch.bfloat16),
        "bf16_scalar": torch.tensor(-2.75, dtype=torch.bfloat16),
        "f16": torch.randn(3).half(),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "bool": torch.tensor([[True, False], [False, True]]),
        "i64": torch.tensor([-(2**62), 0, 2**62 + 7]),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.arange(256, dtype=torch.uint8),
        "c64": torch.randn(3, dtype=torch.complex64),
        "zero_d": torch.tensor(3.5),
        "empty": torch.empty(0),
        "empty_2d": torch.empty(3, 0, 2, dtype=torch.int32),
        "transposed": torch.randn(3, 4).t(),  # non-contiguous
        "param": param,
        "np_f32": np.random.rand(3, 4).astype(np.float32),
        "np_big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
        "np_bool": np.array([True, False, True]),
        "np_empty": np.zeros((0, 7), dtype=np.float64),
        "np_scalar": np.float32(1.25),
        "np_int": np.int64(-5),
        "nested": [1, (2, [3.0, None], ()), [], {"k": (None,)}],
        "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 0.1, 1e-310, math.pi],
        "ints": [0, -1, 2**100, True, False],
        "strs": ["", "ü/ñ", "a/b"],
        "keys": {0: "int", "0": "str", 1.5: "float", None: "none", True: "bool", (1, "x"): "tuple"},
        "bytes": b"\x00\xffabc",
        "none": None,
    }
    path = tmp_path / CHECKPOINT_FILENAME
    save_checkpoint(path, state, {"note": "dtype zoo"})
    loaded, meta = load_checkpoint(path, map_location=torch.device("cpu"))
    assert meta == {"note": "dtype zoo"}

    expected = dict(state)
    expected["param"] = param.detach()  # Parameters come back as plain tensors
    expected["np_big_endian"] = state["np_big_endian"].astype("<i4")  # native byte order
    assert_tree_equal(expected, loaded)
    assert loaded["transposed"].is_contiguous()
    assert math.isnan(loaded["floats"][0]) and math.copysign(1.0, loaded["floats"][3]) == -1.0
    assert loaded["np_big_endian"].tolist() == [[0, 1, 2], [3, 4, 5]]
    # loaded tensors are writable and independent of the file
    loaded["bf16"].add_(1)
    loaded["np_f32"] += 1
    assert not loaded["param"].requires_grad


def test_meta_is_plain_json_and_read_cheaply(tmp_path):
    path = tmp_path / CHECKPOINT_FILENAME
    meta = {
        "epoch": 7,
        "config": {"lr": 0.01, "betas": (0.9, 0.99), "method": "ogm_ge"},
        "metrics": {"acc": np.float32(0.5), "loss": float("nan")},
        "versions": {"torch": torch.__version__},
    }
    save_checkpoint(path, {"x": torch.ones(1)}, meta)
    got = read_checkpoint_meta(path)
    assert got["epoch"] == 7 and got["config"]["betas"] == [0.9, 0.99]
    assert got["metrics"]["acc"] == 0.5 and math.isnan(got["metrics"]["loss"])
    assert load_checkpoint(path)[1]["config"] == got["config"]
    assert header_of(path)["format_version"] == FORMAT_VERSION == 2


def test_save_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "deep" / "dir" / CHECKPOINT_FILENAME
    save_checkpoint(path, {"x": torch.zeros(10)}, {"epoch": 1})
    n = save_checkpoint(path, {"x": torch.ones(3)}, {"epoch": 2})
    assert os.listdir(path.parent) == [CHECKPOINT_FILENAME]  # no temp files left behind
    assert n == path.stat().st_size
    state, meta = load_checkpoint(path)
    assert meta["epoch"] == 2 and torch.equal(state["x"], torch.ones(3))

    # a failed save (unsupported value) leaves the previous checkpoint intact and no temp file
    with pytest.raises(TypeError, match="unsupported type"):
        save_checkpoint(path, {"bad": object()}, {"epoch": 3})
    assert os.listdir(path.parent) == [CHECKPOINT_FILENAME]
    assert read_checkpoint_meta(path)["epoch"] == 2


def test_large_and_small_tensors_span_several_record_batches(tmp_path):
    # Large payloads (>= 1 MiB) are written as their own record batch straight from the
    # tensor's memory; small ones are packed.  Row order, names and contents must survive,
    # and a corrupted large payload (verified on the thread pool) is still reported.
    g = torch.Generator().manual_seed(5)
    state = {
        "small0": torch.randn(3, generator=g),
        "big0": torch.randn(512, 1024, generator=g),  # 2 MiB
        "small1": torch.arange(5),
        "small2": np.arange(7, dtype=np.int16),
        "big1": torch.randn(300, 1000, generator=g, dtype=torch.float64),  # 2.4 MB
        "mid": [torch.full((70_000,), float(i)) for i in range(20)],  # 20 x 280 kB: packed
        "big_np": np.random.default_rng(0).random((400, 400)),  # 1.28 MB
        "empty": torch.empty(0, 4),
    }
    path = tmp_path / CHECKPOINT_FILENAME
    save_checkpoint(path, state, {})
    with pa.memory_map(str(path)) as f:
        reader = pa.ipc.open_file(f)
        n_batches = reader.num_record_batches
        names = reader.read_all().column("name").to_pylist()
    assert n_batches >= 5
    assert names == ["small0", "big0", "small1", "small2", "big1"] + [f"mid/{i}" for i in range(20)] + ["big_np", "empty"]
    loaded, _ = load_checkpoint(path)
    assert_tree_equal(state, loaded)
    assert loaded["big0"].data_ptr() != state["big0"].data_ptr()

    raw = bytearray(path.read_bytes())
    pos = raw.find(state["big1"][150].numpy().tobytes())
    assert pos > 0
    raw[pos] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="file digest mismatch"):
        load_checkpoint(path)


def test_table_layout(simple_ckpt):
    path, _ = simple_ckpt
    with pa.memory_map(str(path)) as f:
        t = pa.ipc.open_file(f).read_all()
    assert t.column_names == ["name", "dtype", "shape", "kind", "data", "sha256"]
    assert t.schema.field("data").type == pa.large_binary()
    assert t.column("name").to_pylist() == ["w", "s/0"]
    assert t.column("shape").to_pylist() == [[8, 8], [3]]
    assert t.column("dtype").to_pylist() == ["float32", "int64"]
    assert t.column("kind").to_pylist() == ["torch", "torch"]
    assert t.column("data")[0].as_py() == torch.arange(64, dtype=torch.float32).numpy().tobytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_are_saved_and_mapped(tmp_path):
    path = tmp_path / CHECKPOINT_FILENAME
    t = torch.randn(5, 7, device="cuda").to(torch.bfloat16)
    save_checkpoint(path, {"t": t, "rng": torch.cuda.get_rng_state_all()}, {})
    cpu, _ = load_checkpoint(path)
    assert cpu["t"].device.type == "cpu" and torch.equal(cpu["t"], t.cpu())
    gpu, _ = load_checkpoint(path, map_location="cuda")
    assert gpu["t"].is_cuda and torch.equal(gpu["t"], t)


# --------------------------------------------------------------------------- no pickle


def test_load_path_uses_no_pickle(simple_ckpt, monkeypatch):
    path, state = simple_ckpt

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used on the checkpoint load path")

    class ForbiddenUnpickler:
        def __init__(self, *args, **kwargs):
            forbidden()

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", ForbiddenUnpickler)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(np, "load", forbidden)
    with pytest.raises(AssertionError):  # the patch is live
        pickle.loads(pickle.dumps(1))
    loaded, meta = load_checkpoint(path)
    assert_tree_equal(state, loaded)
    assert read_checkpoint_meta(path) == meta == {"epoch": 1}


# --------------------------------------------------------------------------- corrupt files


def test_tampered_payload_byte_is_detected(tmp_path):
    path = tmp_path / CHECKPOINT_FILENAME
    payload = torch.arange(1000, dtype=torch.int64) * 7919 + 123456789
    save_checkpoint(path, {"w": payload, "other": torch.ones(3)}, {})
    raw = bytearray(path.read_bytes())
    needle = payload.numpy().tobytes()
    pos = raw.find(needle)
    assert pos >= 0 and raw.find(needle, pos + 1) < 0
    raw[pos + 4001] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "file digest mismatch" in msg and "\n" not in msg
    # no chained low-level exception to print as a traceback
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    assert isinstance(info.value, TunebalError)


def test_rewritten_payload_or_metadata_without_the_digest_is_detected(simple_ckpt, tmp_path):
    # A file rewritten by another Arrow writer keeps the old digest, which no longer matches.
    path, _ = simple_ckpt
    with pa.memory_map(str(path)) as f:
        data = pa.ipc.open_file(f).read_all().column("data").to_pylist()
    data[1] = data[1][:-1] + bytes([data[1][-1] ^ 0x80])
    bad = rewrite(path, tmp_path / "bad.arrow", columns={"data": pa.array(data, pa.large_binary())}, reseal=False)
    with pytest.raises(CheckpointError, match="file digest mismatch"):
        load_checkpoint(bad)
    # the footer edit: a tensor reference moved to another row ("tensor":1 -> "tensor":0)
    raw = path.read_bytes()
    assert raw.count(b'{"tensor":1}') == 2  # the schema is stored twice (stream + footer)
    edited = tmp_path / "edited.arrow"
    edited.write_bytes(raw.replace(b'{"tensor":1}', b'{"tensor":0}'))
    for reader in (load_checkpoint, read_checkpoint_meta):
        with pytest.raises(CheckpointError, match="file digest mismatch"):
            reader(edited)
    # and a valid checkpoint written without a digest (another tool, or format version 1)
    nodigest = tmp_path / "nodigest.arrow"
    md = {b"tunebal": json.dumps(header_of(path)).encode()}
    with pa.memory_map(str(path)) as f:
        table = pa.ipc.open_file(f).read_all().replace_schema_metadata(md)
    with pa.OSFile(str(nodigest), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    with pytest.raises(CheckpointError, match="no tunebal_sha256 digest"):
        load_checkpoint(nodigest)


def _footer_start(raw: bytes) -> int:
    (footer_len,) = struct.unpack("<i", raw[-10:-6])
    return len(raw) - 10 - footer_len


@pytest.mark.parametrize("region", ["footer-and-metadata", "anywhere"])
def test_every_single_bit_flip_is_rejected(tmp_path, region):
    """250 seeded single-bit flips (and 50 random byte values) in the footer/metadata
    region (the first schema message and the footer) or anywhere in the file: each one is
    a one-line CheckpointError from both readers; none loads."""
    path = tmp_path / CHECKPOINT_FILENAME
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_step(model, opt, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    save_checkpoint(path, {"model": model.state_dict(), "opt": opt.state_dict()}, {"epoch": 3, "method": "aim"})
    raw = path.read_bytes()
    (meta_len,) = struct.unpack("<i", raw[12:16])
    if region == "anywhere":
        positions = list(range(len(raw)))
    else:
        positions = list(range(0, 16 + meta_len)) + list(range(_footer_start(raw), len(raw)))
    rng = random.Random(1234)
    edits = [(p, raw[p] ^ (1 << rng.randrange(8))) for p in rng.sample(positions, 250)]
    edits += [(p, (raw[p] + rng.randrange(1, 256)) % 256) for p in rng.sample(positions, 50)]
    bad = tmp_path / "flipped.arrow"
    for pos, value in edits:
        data = bytearray(raw)
        data[pos] = value
        bad.write_bytes(bytes(data))
        for reader in (load_checkpoint, read_checkpoint_meta):
            with pytest.raises(CheckpointError) as info:
                reader(bad)
            msg = str(info.value)
            assert "\n" not in msg and str(bad) in msg, (pos, msg)
    load_checkpoint(path)  # the original still loads


def test_truncated_file(simple_ckpt, tmp_path):
    path, _ = simple_ckpt
    raw = path.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 1, 10, 0):
        bad = tmp_path / f"trunc_{cut}.arrow"
        bad.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match=str(bad)) as info:
            load_checkpoint(bad)
        assert info.value.__cause__ is None
        assert info.value.__context__ is None or info.value.__suppress_context__
        with pytest.raises(CheckpointError, match=str(bad)):
            read_checkpoint_meta(bad)


def test_not_an_arrow_file_and_missing_file(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("this is not an arrow file\n" * 100)
    with pytest.raises(CheckpointError, match="not a readable Arrow IPC file"):
        load_checkpoint(txt)
    torch_file = tmp_path / "model.pt"
    torch.save({"x": torch.ones(2)}, torch_file)
    with pytest.raises(CheckpointError, match=str(torch_file)):
        load_checkpoint(torch_file)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.arrow")
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint_meta(tmp_path / "nope.arrow")


def _with_header(path, dst, mutate):
    header = header_of(path)
    mutate(header)
    return rewrite(path, dst, metadata={b"tunebal": json.dumps(header).encode()})


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h: h.__setitem__("format_version", 1), "unsupported format_version 1"),
        (lambda h: h.pop("format_version"), "unsupported format_version None"),
        (lambda h: h["tree"]["dict"][0].__setitem__(1, {"tensor": 99}), "references tensor row 99"),
        (lambda h: h["tree"]["dict"][0].__setitem__(1, {"ndarray": 0}), "has kind 'torch', expected 'numpy'"),
        (lambda h: h["tree"]["dict"][0].__setitem__(1, {"weird": 1}), "malformed tree node"),
        (lambda h: h.pop("meta"), "lacks 'tree' or 'meta'"),
    ],
    ids=["version1", "no-version", "missing-row", "wrong-kind", "bad-node", "no-meta"],
)
def test_bad_header(simple_ckpt, tmp_path, mutate, message):
    path, _ = simple_ckpt
    bad = _with_header(path, tmp_path / "bad.arrow", mutate)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(bad)
    assert str(bad) in str(info.value)


def test_missing_or_invalid_metadata(simple_ckpt, tmp_path):
    path, _ = simple_ckpt
    bad = rewrite(path, tmp_path / "nometa.arrow", drop_metadata=True)
    with pytest.raises(CheckpointError, match="no 'tunebal' schema metadata"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no 'tunebal' schema metadata"):
        read_checkpoint_meta(bad)
    bad = rewrite(path, tmp_path / "badjson.arrow", metadata={b"tunebal": b"{not json"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(bad)


def test_shape_or_dtype_not_matching_bytes(simple_ckpt, tmp_path):
    path, _ = simple_ckpt
    bad = rewrite(path, tmp_path / "shape.arrow", columns={"shape": pa.array([[8, 9], [3]], pa.list_(pa.int64()))})
    with pytest.raises(CheckpointError, match=r"256 bytes do not match dtype float32 and shape \[8, 9\]"):
        load_checkpoint(bad)
    bad = rewrite(path, tmp_path / "dtype.arrow", columns={"dtype": pa.array(["float32", "int32"])})
    with pytest.raises(CheckpointError, match="do not match dtype int32"):
        load_checkpoint(bad)
    bad = rewrite(path, tmp_path / "evil.arrow", columns={"dtype": pa.array(["float32", "object"])})
    with pytest.raises(CheckpointError, match="unsupported dtype 'object'"):
        load_checkpoint(bad)


def test_wrong_schema_columns(tmp_path):
    header = {"format_version": FORMAT_VERSION, "tree": {"dict": []}, "meta": {}}
    md = {b"tunebal": json.dumps(header).encode()}
    cases = {
        "missing_sha": pa.table({"name": pa.array([], pa.string())}),
        "binary_not_large": pa.table(
            {
                "name": pa.array([], pa.string()),
                "dtype": pa.array([], pa.string()),
                "shape": pa.array([], pa.list_(pa.int64())),
                "kind": pa.array([], pa.string()),
                "data": pa.array([], pa.binary()),
                "sha256": pa.array([], pa.string()),
            }
        ),
    }
    for name, table in cases.items():
        bad = tmp_path / f"{name}.arrow"
        write_sealed(table.replace_schema_metadata(md), bad)
        with pytest.raises(CheckpointError, match="column") as info:
            load_checkpoint(bad)
        assert str(bad) in str(info.value)


# --------------------------------------------------------------------------- experiment dataset


def test_experiment_dataset_reads_all_trials_as_one(tmp_path):
    f1 = tmp_path / "trial_a" / "checkpoint_000001" / CHECKPOINT_FILENAME
    f2 = tmp_path / "nested" / "trial_b" / "checkpoint_000003" / CHECKPOINT_FILENAME
    save_checkpoint(f1, {"model": {"w": torch.ones(2, 3), "b": torch.zeros(3)}}, {"epoch": 1})
    save_checkpoint(
        f2,
        {"model": {"w": torch.ones(4, 3, dtype=torch.bfloat16)}, "rng": np.random.get_state(), "opt": {0: torch.ones(1)}},
        {"epoch": 3},
    )
    (tmp_path / "trial_a" / "result.json").write_text("{}")  # not a checkpoint: ignored
    (tmp_path / "trial_a" / "checkpoint_000001" / ".tunebal_checkpoint.arrow.x.tmp").write_bytes(b"junk")

    ds = experiment_dataset(tmp_path)
    assert sorted(ds.files) == sorted([str(f1.resolve()), str(f2.resolve())])
    t = ds.to_table(columns=["name", "shape", "dtype", "__filename"])
    assert t.num_rows == 2 + 3
    rows = t.to_pylist()
    by_file = {}
    for r in rows:
        by_file.setdefault(os.path.realpath(r["__filename"]), []).append(r["name"])
    assert by_file == {
        str(f1.resolve()): ["model/w", "model/b"],
        str(f2.resolve()): ["model/w", "rng/1", "opt/0"],
    }
    assert {(r["name"], r["dtype"], tuple(r["shape"])) for r in rows} >= {("model/w", "bfloat16", (4, 3))}
    full = ds.to_table()
    assert full.num_rows == 5 and "data" in full.column_names


def test_experiment_dataset_empty_root(tmp_path):
    with pytest.raises(CheckpointError, match="no tunebal_checkpoint.arrow files"):
        experiment_dataset(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        experiment_dataset(tmp_path / "missing")


def test_streamed_and_reread_seals_agree_and_cover_every_block(tmp_path):
    """The digest hashed while writing equals the one computed by re-reading the file
    (tunebal/sealed.py), and a flipped byte in any 1 MiB block of a multi-block file is caught."""
    path = tmp_path / CHECKPOINT_FILENAME
    g = torch.Generator().manual_seed(0)
    save_checkpoint(path, {"a": torch.randn(700_000, generator=g), "b": torch.arange(10)}, {"epoch": 1})
    raw = path.read_bytes()
    assert len(raw) > 2.5 * sealed.BLOCK
    with pa.memory_map(str(path)) as f:
        digest = pa.ipc.open_file(f).schema.metadata[sealed.DIGEST_KEY]
    again = tmp_path / "again.arrow"
    again.write_bytes(raw.replace(digest, b"f" * 64))
    sealed.seal(again, "f" * 64)
    assert again.read_bytes() == raw
    for block in range(len(raw) // sealed.BLOCK + 1):
        data = bytearray(raw)
        pos = min(block * sealed.BLOCK + 12345, len(raw) - 20)
        data[pos] ^= 0x04
        again.write_bytes(bytes(data))
        with pytest.raises(CheckpointError):
            load_checkpoint(again)
