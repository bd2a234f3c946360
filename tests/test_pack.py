"""
Tests for pack.py: the file format (version 2, row-major 2-bit codes and base 3) round-trips the ternary weights
bit-exactly, the CLI packs train.py checkpoints, and broken or older files fail with one clear line. Hermetic, CPU.

    python -m pytest tests/test_pack.py -v
"""

import os
import struct
import threading
from dataclasses import asdict

import numpy as np
import pytest
import torch

import kernel
import model as model_lib
import pack
from quant import export_ternary


def random_tiny(seed, ternary=True, **cfg):
    """A tiny TerDiT with random weights everywhere (zero-init adaLN would make trits and outputs trivial)."""
    torch.manual_seed(seed)
    m = model_lib.build_model("tiny", ternary=ternary, **{"in_channels": 1, **cfg})
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.eval()


def checkpoint(path, ternary=True, **cfg):
    """A train.py-style checkpoint at path; returns its EMA model (the one pack.py packs)."""
    model, ema = random_tiny(0, ternary, **cfg), random_tiny(1, ternary, **cfg)  # different: which was packed?
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "step": 1234,
                "model_config": asdict(ema.config), "args": {}}, path)
    return ema


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    d = tmp_path_factory.mktemp("pack")
    ema = checkpoint(d / "ckpt.pt")
    out = str(d / "tiny.tdit")
    pack.main(["--ckpt", str(d / "ckpt.pt"), "--out", out])
    return ema, out, pack.base3_path(out)


@pytest.mark.parametrize("which", [1, 2])
def test_round_trip_bit_exact(packed, which):
    ema, path = packed[0], packed[which]
    hdr, state = pack.read_packed(path)
    layers = pack.ternary_layers(ema)
    assert len(layers) == 4 * 8  # 4 blocks × (wq, wk, wv, wo, w1, w2, w3, adaLN linear)
    for name, layer in layers:
        trits, alpha = export_ternary(layer)
        assert set(trits.unique().tolist()) == {-1, 0, 1}, name  # non-trivial weights
        codes = state[f"{name}.packed"]
        assert codes.dtype == torch.uint8 and codes.shape == (layer.out_features, -(-layer.in_features // 4)), name
        assert torch.equal(kernel.unpack_2bit(codes, layer.out_features, layer.in_features), trits), name
        assert torch.equal(state[f"{name}.alphas"], alpha), name
    # every full-precision tensor is the bf16 rounding of the original
    trit_keys = {f"{name}.weight" for name, _ in layers}
    for key, t in ema.state_dict().items():
        if key in trit_keys or key.endswith(".alphas"):
            continue
        assert state[key].dtype == torch.float32, key
        assert torch.equal(state[key], t.to(torch.bfloat16).float()), key
    assert model_lib.config_from_dict(hdr["config"]) == ema.config
    assert hdr["step"] == 1234 and hdr["version"] == pack.FORMAT_VERSION == 2


def test_2bit_codes_are_row_major(packed):
    """Format v2 stores kernel.pack_2bit's row-major codes, whatever any kernel's tiling: byte j of row n holds
    k = 4j + i at bits 2i..2i+1 as trit + 1 (padding: code 1). The bytes are checked in the file itself."""
    ema, path = packed[0], packed[1]
    hdr = pack.read_header(path)
    data = open(path, "rb").read()[hdr["data_start"]:]
    name, layer = pack.ternary_layers(ema)[0]
    e = next(e for e in hdr["tensors"] if e["name"] == f"{name}.packed")
    N, K = e["shape"]
    stored = np.frombuffer(data, np.uint8, count=e["nbytes"], offset=e["offset"]).reshape(N, -(-K // 4))
    trits = export_ternary(layer)[0]
    codes = np.pad((trits + 1).numpy().astype(np.uint8), ((0, 0), (0, -K % 4)), constant_values=1)
    expected = sum(codes[:, i::4] << (2 * i) for i in range(4)).astype(np.uint8)
    assert np.array_equal(stored, expected)
    assert np.array_equal(stored, kernel.pack_2bit(trits).numpy())
    # a width that is not a multiple of 4 (K = 6): one padding pair per row, code 1
    t = torch.tensor([[-1, 0, 1, 1, -1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.int8)
    assert kernel.pack_2bit(t).tolist() == [[0b10100100, 0b01010100], [0b10101010, 0b01011010]]
    assert torch.equal(pack.read_packed(packed[2])[1][f"{name}.packed"], torch.from_numpy(stored.copy()))  # base 3 too


def test_is_packed(packed, tmp_path):
    assert pack.is_packed(packed[1]) and pack.is_packed(packed[2])
    (tmp_path / "x.pt").write_bytes(b"PK")
    assert not pack.is_packed(tmp_path / "x.pt")


def test_base3_is_smaller(packed):
    assert os.path.getsize(packed[2]) < os.path.getsize(packed[1])


def test_base3_codec():
    trits = torch.randint(-1, 2, (7, 13), dtype=torch.int8)  # 91 trits: exercises the padding
    assert torch.equal(pack.unpack_base3(pack.pack_base3(trits), 7, 13), trits)


def _corrupted(path, tmp_path, edit):
    data = bytearray(open(path, "rb").read())
    data = edit(data)
    bad = tmp_path / "bad.tdit"
    bad.write_bytes(bytes(data))
    return str(bad)


@pytest.mark.parametrize("which", [1, 2])
def test_truncated(packed, tmp_path, which):
    with pytest.raises(ValueError, match="truncated"):
        pack.read_packed(_corrupted(packed[which], tmp_path, lambda d: d[:-100]))


def test_wrong_magic(packed, tmp_path):
    def edit(d):
        d[0] ^= 0xFF
        return d
    with pytest.raises(ValueError, match="not a TerDiT packed file"):
        pack.read_packed(_corrupted(packed[1], tmp_path, edit))


@pytest.mark.parametrize("version", pack.OLDER_VERSIONS)
def test_other_version_refused_with_one_line(packed, tmp_path, version):
    """A file of an older format version (1: the codes in an older kernel's tile order) is refused before anything
    else is read, with one line naming its version and the command that regenerates it."""
    def edit(d):
        d[4:8] = struct.pack("<I", version)
        return d
    bad = _corrupted(packed[1], tmp_path, edit)
    with pytest.raises(ValueError) as err:
        pack.read_packed(bad)
    msg = str(err.value)
    assert f"format version {version}" in msg and len(msg.splitlines()) == 1
    assert f"regenerate it with `python pack.py --ckpt <training checkpoint> --out {bad}`" in msg


@pytest.mark.parametrize("version", [0, 3, 257])
def test_a_version_that_never_existed_is_a_corrupt_header(packed, tmp_path, version):
    """Issue 30: a flipped bit in the version field (257 = 1 + 256) said "format version 257", as if the file were
    merely of another version."""
    def edit(d):
        d[4:8] = struct.pack("<I", version)
        return d
    with pytest.raises(ValueError) as err:
        pack.read_packed(_corrupted(packed[1], tmp_path, edit))
    assert "bad.tdit is corrupt or not a .tdit file" in str(err.value) and len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("where", ["data", "index"])
def test_corrupt(packed, tmp_path, where):
    def edit(d):
        d[-1 if where == "data" else d.index(b'"offset": 1024') + 13] ^= 0x01  # a data bit; offset 1024 -> 1025
        return d
    with pytest.raises(ValueError, match="corrupt"):
        pack.read_packed(_corrupted(packed[2], tmp_path, edit))


def test_refuses_full_precision_and_non_checkpoints(tmp_path):
    checkpoint(tmp_path / "fp.pt", ternary=False)
    with pytest.raises(ValueError, match="full-precision"):
        pack.main(["--ckpt", str(tmp_path / "fp.pt"), "--out", str(tmp_path / "fp.tdit")])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        pack.main(["--ckpt", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "junk.tdit")])
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a TerDiT training checkpoint"):
        pack.main(["--ckpt", str(tmp_path / "other.pt"), "--out", str(tmp_path / "other.tdit")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pack.main(["--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "missing.tdit")])
    assert sorted(os.listdir(tmp_path)) == ["fp.pt", "junk.pt", "other.pt"]  # nothing written


def test_refuses_a_packed_file_and_an_older_config(packed, tmp_path):
    with pytest.raises(ValueError) as err:
        pack.main(["--ckpt", packed[1], "--out", str(tmp_path / "again.tdit")])
    assert "is already packed: pack its training checkpoint" in str(err.value) and len(str(err.value).splitlines()) == 1
    checkpoint(tmp_path / "old.pt")
    ckpt = torch.load(tmp_path / "old.pt", weights_only=True)
    ckpt["model_config"]["patch_layout"] = "cpp"  # a field this code no longer has
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="older version of this code .*: regenerate it with train.py / pack.py"):
        pack.main(["--ckpt", str(tmp_path / "old.pt"), "--out", str(tmp_path / "old.tdit")])
    assert not os.path.exists(tmp_path / "again.tdit") and not os.path.exists(tmp_path / "old.tdit")


def test_write_is_atomic(packed, tmp_path, monkeypatch):
    """A write that fails after the bytes went out (here: the flush to disk) leaves the target as it was, and no
    temp file beside it."""
    ema, path = packed[0], str(tmp_path / "m.tdit")
    pack.write_packed(path, asdict(ema.config), 1, pack.encode(ema), trits_per_byte=4)
    before = open(path, "rb").read()

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="disk full"):
        pack.write_packed(path, asdict(ema.config), 2, pack.encode(ema), trits_per_byte=5)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["m.tdit"]


def test_out_naming_a_tdit3_writes_the_same_pair(tmp_path):
    """Issue 30: --out m.tdit3 (repacking a .tdit3) wrote 2-bit codes into m.tdit3 and base 3 into m.tdit3.tdit3."""
    checkpoint(tmp_path / "ckpt.pt")
    pack.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "m.tdit3")])
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "m.tdit", "m.tdit3"]
    assert pack.read_header(tmp_path / "m.tdit")["trits_per_byte"] == 4
    assert pack.read_header(tmp_path / "m.tdit3")["trits_per_byte"] == 5


def test_a_failed_write_leaves_the_old_pair_or_no_twin(packed, tmp_path, monkeypatch):
    """.tdit and .tdit3 are written as a pair or not at all: a write of the twin that fails leaves both old files;
    a rename of the 2-bit file that fails after its twin's removes the new twin (no mismatched pair)."""
    ema = packed[0]
    path, twin = str(tmp_path / "m.tdit"), str(tmp_path / "m.tdit3")
    pack.write_pair(path, asdict(ema.config), 1, pack.encode(ema))
    old = open(path, "rb").read(), open(twin, "rb").read()
    fsync = os.fsync

    def twin_fails(fd):  # the twin is flushed first (its with-block is the inner one)
        if os.readlink(f"/proc/self/fd/{fd}").startswith(twin):
            raise OSError(28, "No space left on device")
        fsync(fd)
    monkeypatch.setattr(os, "fsync", twin_fails)
    with pytest.raises(OSError, match="disk full"):
        pack.write_pair(path, asdict(ema.config), 2, pack.encode(ema))
    assert (open(path, "rb").read(), open(twin, "rb").read()) == old and sorted(os.listdir(tmp_path)) == ["m.tdit", "m.tdit3"]
    monkeypatch.undo()
    replace = os.replace

    def rename_fails(src, dst):
        if dst == path:
            raise OSError(5, "Input/output error")
        replace(src, dst)
    monkeypatch.setattr(os, "replace", rename_fails)
    with pytest.raises(OSError, match="Input/output error"):
        pack.write_pair(path, asdict(ema.config), 3, pack.encode(ema))
    assert open(path, "rb").read() == old[0] and os.listdir(tmp_path) == ["m.tdit"]


def test_two_runs_to_one_out_leave_a_matching_pair(tmp_path, monkeypatch):
    """Issue 30: two pack.py runs to one --out could interleave their renames and leave a .tdit of one checkpoint
    beside a .tdit3 of the other. Here the first run to rename a file waits (up to 1 s) after it for the other run
    to rename both of its own: without the folder lock the other run would, and the pair would not match."""
    for name, step in (("a.pt", 1), ("b.pt", 2)):
        checkpoint(tmp_path / name)
        ckpt = torch.load(tmp_path / name, weights_only=True)
        torch.save({**ckpt, "step": step}, tmp_path / name)
    out, replace, order, other_done = str(tmp_path / "m.tdit"), os.replace, [], threading.Event()

    def interleaving_replace(src, dst):
        me = threading.current_thread().name
        order.append(me)
        replace(src, dst)
        if order[0] == me and order.count(me) == 1:
            other_done.wait(timeout=1)
        if order[0] != me and order.count(me) == 2:
            other_done.set()
    monkeypatch.setattr(os, "replace", interleaving_replace)
    runs = [threading.Thread(target=pack.main, args=(["--ckpt", str(tmp_path / n), "--out", out],), name=n)
            for n in ("a.pt", "b.pt")]
    for r in runs:
        r.start()
    for r in runs:
        r.join()
    assert pack.read_header(out)["step"] == pack.read_header(pack.base3_path(out))["step"]
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt", "m.tdit", "m.tdit3"]


def test_a_flipped_bit_in_a_checkpoint_is_refused_and_one_without_a_checksum_packs(tmp_path):
    """Issue 30: a .pt with one flipped bit in an EMA weight was packed without a word. Checkpoints written
    before there were checksums (like checkpoint() here) still pack."""
    import cli
    checkpoint(tmp_path / "old.pt")
    pack.main(["--ckpt", str(tmp_path / "old.pt"), "--out", str(tmp_path / "old.tdit")])
    ckpt = torch.load(tmp_path / "old.pt", weights_only=True)
    torch.save({**ckpt, "checksum": cli.checksum(ckpt)}, tmp_path / "new.pt")
    pack.main(["--ckpt", str(tmp_path / "new.pt"), "--out", str(tmp_path / "new.tdit")])
    data = bytearray((tmp_path / "new.pt").read_bytes())
    w = next(iter(ckpt["ema"].values())).numpy().tobytes()
    data[data.index(w) + 5] ^= 0x10
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="flipped.pt is corrupt: its contents do not match the checksum"):
        pack.main(["--ckpt", str(tmp_path / "flipped.pt"), "--out", str(tmp_path / "flipped.tdit")])
    assert not os.path.exists(tmp_path / "flipped.tdit")
