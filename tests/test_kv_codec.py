"""Native quantize-on-store, Hadamard rotation and CRC32 against their references, bit for bit: every bit width,
both group layouts (per token along head_dim, per channel along tokens), Hadamard-rotated input, odd lengths, fp16
edge cases (constant groups, subnormal and huge ranges, ties of round-half-to-even), and whole caches filled both
ways."""

from __future__ import annotations

import platform
import zlib

import pytest
import torch

from edgellm.kernels import kvattn
from edgellm.kv import QuantizedKVCache
from edgellm.kv.codec import hadamard, hadamard_reference, quantize, quantize_reference


@pytest.fixture(scope="module", autouse=True)
def ext():
    if kvattn._codec() is None:
        pytest.skip("native kernel unavailable (no compiler or ninja, or EDGELLM_NO_NATIVE=1)")


def same(a, b) -> None:
    for name in ("data", "scales", "zeros"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        bits = (lambda t: t.contiguous().view(torch.int16)) if x.dtype == torch.float16 else (lambda t: t)
        assert torch.equal(bits(x), bits(y)), name  # fp16 compared as bits: -0 and NaN patterns too
    assert (a.bits, a.group, a.shape, a.dim) == (b.bits, b.group, b.shape, b.dim)


def keys(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random K with outlier channels, a constant group, ties and extreme ranges mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x[..., :3] *= 40
    x.view(-1, shape[-1])[0] = 1.5  # constant rows: zero range, scale 0
    x.view(-1, shape[-1])[1] = torch.arange(shape[-1]) * 0.5  # exact multiples: codes landing on .5 ties
    x.view(-1, shape[-1])[2] *= 1e-6  # fp16 subnormal scales
    x.view(-1, shape[-1])[3] *= 3e4  # past fp16's range after subtracting the min
    return x.to(dtype)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [4, 37, 301])
@pytest.mark.parametrize("group", [64, 32, 8])
def test_token_groups_match_reference(bits, rotate, dtype, tokens, group):
    x = keys((2, 3, tokens, 64), seed=bits * tokens)
    if rotate:
        x = hadamard(x)
    x = x.to(dtype)
    same(quantize(x, bits, group), quantize_reference(x, bits, group))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("tokens,group", [(64, 64), (96, 32), (40, 8), (4, 4)])
@pytest.mark.parametrize("head_dim", [64, 48])
def test_channel_groups_match_reference(bits, rotate, tokens, group, head_dim):
    x = keys((2, 3, tokens, head_dim), seed=bits + tokens)
    if rotate and head_dim & (head_dim - 1) == 0:
        x = hadamard(x)
    same(quantize(x, bits, group, dim=2), quantize_reference(x, bits, group, dim=2))


@pytest.mark.parametrize("n", [1, 2, 16, 64, 128, 256])
def test_hadamard_matches_reference_and_matrix(n):
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n)) * 7
    out = hadamard(x)
    assert torch.equal(out, hadamard_reference(x))
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    torch.testing.assert_close(out, x @ (h / n**0.5), rtol=1e-5, atol=1e-4)
    assert torch.equal(hadamard(x.bfloat16()), hadamard_reference(x.bfloat16()))


def test_native_refuses_what_it_cannot_do():
    with pytest.raises(ValueError):
        quantize(torch.randn(2, 10), 4, 4)  # group does not divide
    with pytest.raises(ValueError):
        hadamard(torch.randn(2, 12))
    empty = torch.zeros(1, 2, 0, 64)
    same(quantize(empty, 4, 64), quantize_reference(empty, 4, 64))


@pytest.mark.parametrize("scheme,rotate", [("token", False), ("token", True), ("kivi", True)])
@pytest.mark.parametrize("bits", [4, 2])
def test_cache_filled_natively_equals_reference_fill(monkeypatch, scheme, rotate, bits):
    """A whole cache filled through the native store holds exactly the bytes the PyTorch path stores."""
    def fill() -> dict[str, torch.Tensor]:
        cache = QuantizedKVCache(1, 2, 64, 8, bits, 32, scheme, 16 if scheme == "kivi" else 0, rotate,
                                 torch.bfloat16)
        g = torch.Generator().manual_seed(0)
        for n in (100, 1, 1, 70, 33):
            cache.update_and_fetch(torch.randn(1, 2, n, 64, generator=g), torch.randn(1, 2, n, 64, generator=g))
        return cache.state()

    native = fill()
    monkeypatch.setattr(kvattn, "_codec", lambda: None)
    reference = fill()
    assert native.keys() == reference.keys()
    for name in native:
        assert torch.equal(native[name], reference[name]), name


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 63, 64, 65, 80, 127, 128, 255, 256, 257, 272, 319, 320, 511, 512,
                               575, 1000, 4099, 65536 + 7])
@pytest.mark.parametrize("init", [0, 0x1234567, 0xFFFFFFFF])
def test_crc32_matches_zlib(n, init):
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    assert kvattn.crc32(data, init) == zlib.crc32(data.numpy().tobytes(), init)
    if n % 2 == 0:  # any dtype: the bytes as they lie
        assert kvattn.crc32(data.view(torch.float16), init) == zlib.crc32(data.numpy().tobytes(), init)


def test_evicting_cache_lines_keeps_every_byte():
    """The planner's weight flush writes lines back before dropping them: the tensors read back unchanged, even
    ones written just before (dirty lines) and ones not a whole number of lines long."""
    tensors = [torch.randn(100_003), torch.randint(0, 256, (77,), dtype=torch.uint8), torch.randn(3, 65)]
    copies = [t.clone() for t in tensors]
    tensors[0] += 1  # dirty lines
    copies[0] += 1
    evicted = kvattn.evict_lines(tensors)
    assert evicted or platform.machine() not in ("x86_64", "AMD64")  # x86 evicts line by line
    assert all(torch.equal(t, c) for t, c in zip(tensors, copies, strict=True))


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("tokens", [0, 1, 777, 70_000])  # 70K fp16 rows of 64: 8.5 MiB, in chunks
def test_read_into_fills_strided_views_like_a_plain_read(tmp_path, monkeypatch, native, tokens):
    """Views of wider buffers (a cache's first `tokens` rows per head) filled from a file in C order, each view's
    CRC32 continuing from its own init: the same bytes and checksums as reading the file and slicing it."""
    gen = torch.Generator().manual_seed(tokens)
    parts = [torch.randn(1, 2, tokens, 32, generator=gen).half(),
             torch.randint(0, 256, (1, 2, tokens, 7), generator=gen, dtype=torch.uint8),
             torch.randn(3, 5, generator=gen)]
    path = tmp_path / "data.bin"
    path.write_bytes(b"junk" + b"".join(p.numpy().tobytes() for p in parts) + b"tail")
    buffers = [torch.zeros(1, 2, tokens + 9, 32, dtype=torch.float16),
               torch.zeros(1, 2, tokens + 1, 7, dtype=torch.uint8), torch.zeros(3, 5)]
    views = [buffers[0][:, :, :tokens], buffers[1][:, :, :tokens], buffers[2]]
    inits = [0, 0x1234567, 0xFFFFFFFF]
    if not native:
        monkeypatch.setattr(kvattn, "_codec", lambda: None)
    with open(path, "rb", buffering=0) as f:
        f.seek(4)
        crcs = kvattn.read_into(f, views, inits)
        assert f.tell() == 4
    for part, view, init, crc in zip(parts, views, inits, crcs, strict=True):
        assert torch.equal(view, part)
        assert crc == zlib.crc32(part.numpy().tobytes(), init)
    assert not buffers[0][:, :, tokens:].any() and not buffers[1][:, :, tokens:].any()  # nothing past the views


@pytest.mark.parametrize("native", [True, False])
def test_read_into_gathers_many_small_runs(tmp_path, monkeypatch, native):
    """More runs than one preadv takes (IOV_MAX is 1024), of odd sizes, some past a chunk: bytes and CRCs as a
    plain read gives, each view's CRC32 over its own runs only."""
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 3, 700, 5, 300_000, 2, 17]
    buffers = [torch.zeros(1500, s + 1, dtype=torch.uint8) if s < 100 else torch.zeros(2, s + 3, dtype=torch.uint8)
               for s in sizes]
    views = [b[:, :s] for b, s in zip(buffers, sizes, strict=True)]
    parts = [torch.randint(0, 256, v.shape, generator=gen, dtype=torch.uint8) for v in views]
    path = tmp_path / "runs.bin"
    path.write_bytes(b"".join(p.numpy().tobytes() for p in parts))
    inits = list(range(len(views)))
    if not native:
        monkeypatch.setattr(kvattn, "_codec", lambda: None)
    with open(path, "rb", buffering=0) as f:
        crcs = kvattn.read_into(f, views, inits)
    for part, view, init, crc in zip(parts, views, inits, crcs, strict=True):
        assert torch.equal(view, part)
        assert crc == zlib.crc32(part.numpy().tobytes(), init)
    assert not any(b[:, s:].any() for b, s in zip(buffers, sizes, strict=True))


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("tokens", [0, 5, 48, 70_001])  # inside one block, whole blocks, megabytes over threads
def test_read_into_fills_pool_blocks_through_a_block_table(tmp_path, monkeypatch, native, tokens):
    """A file's (1, heads, tokens, width) tensors read into a block pool's fields through a scrambled block table:
    each head's token t in row t % block_tokens of block table[t // block_tokens], the same CRC32 as a plain read,
    and no other block touched; a plain view read alongside in file order."""
    gen = torch.Generator().manual_seed(tokens)
    heads, bt, width = 3, 16, 8
    blocks = -(-tokens // bt)
    fields = [torch.zeros(blocks + 3, heads, bt, width, dtype=torch.float16),
              torch.zeros(blocks + 3, heads, bt, width // 2, dtype=torch.uint8)]
    table = torch.randperm(blocks + 3, generator=gen)[:blocks].tolist()
    parts = [torch.randn(1, heads, tokens, width, generator=gen).half(),
             torch.randint(0, 256, (7,), generator=gen, dtype=torch.uint8),
             torch.randint(0, 256, (1, heads, tokens, width // 2), generator=gen, dtype=torch.uint8)]
    path = tmp_path / "paged.bin"
    path.write_bytes(b"".join(p.numpy().tobytes() for p in parts))
    plain = torch.zeros(7, dtype=torch.uint8)
    if not native:
        monkeypatch.setattr(kvattn, "_codec", lambda: None)
    with open(path, "rb", buffering=0) as f:
        crcs = kvattn.read_into(f, [fields[0], plain, fields[1]], [1, 2, 3], [(table, tokens), None, (table, tokens)])
    assert torch.equal(plain, parts[1])
    for field, part in ((fields[0], parts[0]), (fields[1], parts[2])):
        for j, block in enumerate(table):
            rows = min(bt, tokens - j * bt)
            assert torch.equal(field[block, :, :rows], part[0, :, j * bt:j * bt + rows])
            assert not field[block, :, rows:].any()
        assert not field[[b for b in range(blocks + 3) if b not in table]].any()
    assert crcs == [zlib.crc32(p.numpy().tobytes(), init) for p, init in zip(parts, [1, 2, 3], strict=True)]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("ends_early", [False, True])
def test_read_into_splits_views_across_threads(tmp_path, threads, ends_early):
    """Megabytes of views are read by several threads, each taking whole views at its own file offset: the same bytes
    and per-view CRCs as one plain read, whatever the thread count; a file that ends early fails the whole read."""
    gen = torch.Generator().manual_seed(threads)
    sizes = [700_000, 3, 1_300_000, 900_000, 50, 2_100_000, 400_000, 1_000_001]
    buffers = [torch.zeros(s + 5, dtype=torch.uint8) for s in sizes]
    views = [b[:s] for b, s in zip(buffers, sizes, strict=True)]
    parts = [torch.randint(0, 256, (s,), generator=gen, dtype=torch.uint8) for s in sizes]
    data = b"".join(p.numpy().tobytes() for p in parts)
    path = tmp_path / "big.bin"
    path.write_bytes(data[:-1] if ends_early else data)
    inits = [7 * i for i in range(len(views))]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with open(path, "rb", buffering=0) as f:
            if ends_early:
                with pytest.raises(RuntimeError, match="ended early"):
                    kvattn.read_into(f, views, inits)
                return
            crcs = kvattn.read_into(f, views, inits)
    finally:
        torch.set_num_threads(before)
    for part, view, init, crc in zip(parts, views, inits, crcs, strict=True):
        assert torch.equal(view, part)
        assert crc == zlib.crc32(part.numpy().tobytes(), init)
    assert not any(b[s:].any() for b, s in zip(buffers, sizes, strict=True))


@pytest.mark.parametrize("native", [True, False])
def test_read_into_raises_when_the_file_ends_early(tmp_path, monkeypatch, native):
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(100))
    if not native:
        monkeypatch.setattr(kvattn, "_codec", lambda: None)
    with open(path, "rb", buffering=0) as f, pytest.raises((ValueError, RuntimeError), match="ended early"):
        kvattn.read_into(f, [torch.zeros(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)], [0, 0])
