"""Vocabulary scan: Triton against the reference, streaming, and the used ids / remap it yields."""

import pytest
import torch

import pema_triton
from helpers.devices import BACKENDS, DEVICE
from pema_triton.errors import IdOutOfRangeError, PemaDTypeError, UsedIdsError
from pema_triton.vocab import used_ids_from_byte_map


def _fresh(vocab_size):
    return (
        torch.zeros(vocab_size, dtype=torch.uint8, device=DEVICE),
        torch.zeros(vocab_size, dtype=torch.int64, device=DEVICE),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    "vocab_size, shape",
    [(1, (5,)), (97, (1,)), (30_522, (8, 128)), (1_000_000, (200_000,))],
    ids=["V1", "N1", "bert", "V1M"],
)
def test_scan_matches_unique_and_bincount(vocab_size, shape, id_dtype, backend):
    gen = torch.Generator().manual_seed(0)
    # Zipf-like ids: a few very frequent, a long tail, so counts vary over orders of magnitude.
    ids = (torch.rand(shape, generator=gen) ** 4 * vocab_size).long().clamp_(max=vocab_size - 1)
    ids.view(-1)[0] = vocab_size - 1
    ids = ids.to(device=DEVICE, dtype=id_dtype)
    byte_map, counts = _fresh(vocab_size)

    pema_triton.scan_ids(ids, byte_map, counts, backend=backend)

    assert torch.equal(used_ids_from_byte_map(byte_map), torch.unique(ids.long()))
    assert torch.equal(counts, torch.bincount(ids.reshape(-1).long(), minlength=vocab_size))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_streams_chunks_into_one_map(backend):
    vocab_size = 5000
    chunks = [torch.randint(0, vocab_size, (n,), device=DEVICE) for n in (1, 700, 3, 4096)]
    chunks.append(torch.full((2, 9), 4999, device=DEVICE))  # every id the same
    byte_map, counts = _fresh(vocab_size)
    for chunk in chunks:
        pema_triton.scan_ids(chunk, byte_map, counts, backend=backend)
    everything = torch.cat([c.reshape(-1) for c in chunks])
    assert torch.equal(used_ids_from_byte_map(byte_map), torch.unique(everything))
    assert torch.equal(counts, torch.bincount(everything, minlength=vocab_size))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_ignore_index_and_out_of_range(backend):
    byte_map, counts = _fresh(10)
    labels = torch.tensor([[-100, 3, 3, -100, 9]], device=DEVICE)
    pema_triton.scan_ids(labels, byte_map, counts, ignore_index=-100, backend=backend)
    assert used_ids_from_byte_map(byte_map).tolist() == [3, 9]
    assert counts.tolist() == [0, 0, 0, 2, 0, 0, 0, 0, 0, 1]

    # An ignored id inside the vocabulary (a pad id used as the ignored label) is skipped too, in both paths.
    byte_map_pad, counts_pad = _fresh(10)
    pema_triton.scan_ids(torch.tensor([0, 5, 0, 7], device=DEVICE), byte_map_pad, counts_pad, ignore_index=0,
                         backend=backend)
    assert used_ids_from_byte_map(byte_map_pad).tolist() == [5, 7]
    assert counts_pad.tolist() == [0, 0, 0, 0, 0, 1, 0, 1, 0, 0]

    with pytest.raises(IdOutOfRangeError, match=r"\[-100, 10, 12\] are outside the vocabulary \[0, 10\)") as err:
        pema_triton.scan_ids(torch.tensor([1, 10, -100, 12], device=DEVICE), byte_map, backend=backend)
    assert err.value.ids == [-100, 10, 12]
    assert byte_map[1] == 1  # the valid ids of the chunk are still marked
    with pytest.raises(PemaDTypeError, match="int32 or int64"):
        pema_triton.scan_ids(torch.tensor([1.0], device=DEVICE), byte_map, backend=backend)
    with pytest.raises(PemaDTypeError, match="byte_map must be a contiguous 1-D uint8"):
        pema_triton.scan_ids(torch.tensor([1], device=DEVICE), byte_map.bool(), backend=backend)
    with pytest.raises(PemaDTypeError, match="counts must be a contiguous int64"):
        pema_triton.scan_ids(torch.tensor([1], device=DEVICE), byte_map, counts.int(), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocabulary_scan_used_ids_and_remap(backend):
    scan = pema_triton.VocabularyScan(50, device=DEVICE, count=True, backend=backend)
    scan.update(torch.tensor([[7, 3, 7]])).update_all([torch.tensor([49, -100]), torch.tensor([0], dtype=torch.int32)])

    assert scan.used_ids().tolist() == [0, 3, 7, 49]
    assert scan.used_ids(keep=[1, 3]).tolist() == [0, 1, 3, 7, 49]
    assert scan.num_used == 4 and scan.num_tokens == 6  # keep did not change the scan itself
    remap = scan.remap()
    assert remap.dtype == torch.int32 and remap.shape == (50,)
    assert remap[[0, 3, 7, 49]].tolist() == [0, 1, 2, 3] and int((remap == -1).sum()) == 46
    assert scan.counts[7] == 2
    with pytest.raises(UsedIdsError, match="outside the vocabulary"):
        scan.used_ids(keep=[50])


def test_build_remap_round_trips():
    used = torch.tensor([0, 5, 6, 99])
    remap = pema_triton.build_remap(used, 100)
    assert torch.equal(torch.nonzero(remap >= 0).flatten(), used)
    assert torch.equal(remap[used].long(), torch.arange(4))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
@pytest.mark.parametrize("vocab_size", [1, 31, 32, 33, 30_522, 1_000_000])
def test_packed_bit_scan_equals_the_byte_map(vocab_size):
    """The layout kept for the benchmark marks the same ids, including bit 31 (the int32 sign bit) and V - 1."""
    from pema_triton.ops.kernels import scan_ids_packed, used_ids_from_packed

    gen = torch.Generator().manual_seed(0)
    ids = (torch.rand(50_000, generator=gen) ** 4 * vocab_size).long().clamp_(max=vocab_size - 1)
    ids[:3] = torch.tensor([0, vocab_size - 1, min(31, vocab_size - 1)])
    ids = ids.to(DEVICE)
    words = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32, device=DEVICE)
    for chunk in ids.split(20_000):  # streams like the byte map
        assert int(scan_ids_packed(chunk, words, vocab_size)) == 0
    assert torch.equal(used_ids_from_packed(words, vocab_size), torch.unique(ids))
    assert int(scan_ids_packed(torch.tensor([-1, vocab_size], device=DEVICE), words, vocab_size)) == 2
