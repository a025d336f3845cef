"""The compression masks: who reads whom, position ids, the printer, and clear errors for bad sizes."""

import pytest
import torch

from minimoe.compress.masks import (MEMORY, TEXT, build_layout, causal_mask, check_mask, gist_mask, global_mask,
                                    memory_count, pic_mask, show_mask)


def reads(layout, query_kind, query_source, key_kind, key_source) -> bool:
    slot = {(int(k), int(s)): i for i, (k, s) in enumerate(zip(layout.kind, layout.source))}
    return bool(layout.attention_mask[0, 0, slot[(query_kind, query_source)], slot[(key_kind, key_source)]])


def test_causal_mask_is_lower_triangular_with_positions():
    layout = causal_mask(5)
    assert torch.equal(layout.attention_mask[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4]]


def test_global_mask_memory_reads_whole_context():
    layout = global_mask(8, 2)
    assert layout.attention_mask.shape == (1, 1, 10, 10) and layout.num_text == 8 and layout.num_memory == 2
    assert all(reads(layout, MEMORY, 0, TEXT, i) for i in range(8))
    assert reads(layout, MEMORY, 1, MEMORY, 0) and not reads(layout, MEMORY, 0, MEMORY, 1)
    assert layout.position_ids[0, 8:].tolist() == [8, 9]


@pytest.mark.parametrize("layout_name", ["append", "interleave"])
@pytest.mark.parametrize("mem_sees_prev_mem", [False, True])
def test_pic_memory_reads_only_its_chunk(layout_name, mem_sees_prev_mem):
    layout = pic_mask(12, 4, 2, layout_name, mem_sees_prev_mem)  # 3 chunks of 4 tokens, 2 memory tokens each
    for j in range(6):
        chunk = j // 2
        for i in range(12):
            assert reads(layout, MEMORY, j, TEXT, i) == (i // 4 == chunk), (j, i)
        for other in range(6):
            expected = (other // 2 == chunk and other <= j) or (mem_sees_prev_mem and other // 2 < chunk)
            assert reads(layout, MEMORY, j, MEMORY, other) == expected, (j, other)
    for i in range(12):  # text reads its own chunk's text causally, never memory
        for other in range(12):
            assert reads(layout, TEXT, i, TEXT, other) == (other // 4 == i // 4 and other <= i)
        assert not any(reads(layout, TEXT, i, MEMORY, j) for j in range(6))


def test_pic_layouts_and_positions():
    append, interleave = pic_mask(8, 4, 2, "append"), pic_mask(8, 4, 2, "interleave")
    assert append.kind.tolist() == [TEXT] * 8 + [MEMORY] * 4
    assert interleave.kind.tolist() == [TEXT] * 4 + [MEMORY] * 2 + [TEXT] * 4 + [MEMORY] * 2
    restart = pic_mask(8, 4, 2, "interleave", positions="restart")
    assert restart.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]]
    assert append.position_ids.tolist() == [list(range(12))]


def test_one_chunk_is_the_icae_mask():
    for layout in ("append", "interleave"):
        pic, icae = pic_mask(16, 16, 4, layout), global_mask(16, 4)
        assert all(torch.equal(a, b) for a, b in zip(pic, icae))


def test_gist_mask_after_tokens_read_only_the_gist():
    layout = gist_mask(4, 2, 3)
    mask = layout.attention_mask[0, 0]
    assert not mask[6:, :4].any() and mask[6:, 4:6].all()
    assert torch.equal(mask[6:, 6:], torch.ones(3, 3, dtype=torch.bool).tril())
    assert mask[4:6, :4].all()


def test_show_mask_prints_one_row_per_slot():
    text = show_mask(pic_mask(8, 4, 2, "interleave", True))
    lines = text.splitlines()
    assert len(lines) == 2 + 12
    assert lines[2].split()[0] == "t0" and lines[2].split()[2:] == ["#"] + ["."] * 11
    assert lines[-1].split()[0] == "m3" and lines[-1].split()[1] == "p11"
    row_m3 = lines[-1].split()[2:]  # m3 reads m0, m1 (earlier memory), t4..t7, m2 and itself
    assert row_m3 == [".", ".", ".", ".", "#", "#", "#", "#", "#", "#", "#", "#"]
    with pytest.raises(ValueError, match="max_slots"):
        show_mask(global_mask(64, 4))


def test_build_layout_dispatches_and_counts_memory():
    assert build_layout("global", 64, 16).num_memory == 4
    assert build_layout("pic", 64, 16, chunk_size=32, layout="interleave").num_memory == 4
    assert memory_count(512, 64) == 8
    with pytest.raises(ValueError, match="unknown compression variant 'ring'"):
        build_layout("ring", 64, 16)
    with pytest.raises(ValueError, match="needs chunk_size"):
        build_layout("pic", 64, 16)


@pytest.mark.parametrize("call, message", [
    (lambda: pic_mask(64, 32, 5), "ratio 5 does not divide the chunk of 32 tokens"),
    (lambda: pic_mask(64, 48, 4), "chunk_size 48 does not divide the context of 64"),
    (lambda: pic_mask(64, 32, 64), "ratio 64 does not divide the chunk of 32"),
    (lambda: global_mask(4, 8), "8 memory tokens for a context of 4 tokens"),
    (lambda: memory_count(100, 3), "ratio 3 does not divide the context of 100"),
    (lambda: pic_mask(64, 32, 4, layout="spiral"), "layout must be one of"),
    (lambda: gist_mask(2, 3, 1), "3 gist tokens for 2 text tokens"),
    (lambda: causal_mask(0), "num_tokens must be an int >= 1"),
])
def test_bad_sizes_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_row_with_nothing_to_read_is_refused():
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    mask[2] = False  # a variant that forgot the diagonal for row 2
    with pytest.raises(ValueError, match="query row 2 .* reads no key"):
        check_mask(mask)
    kind = torch.tensor([TEXT, TEXT, MEMORY, MEMORY])
    with pytest.raises(ValueError, match="a memory token"):
        check_mask(mask, kind)
    with pytest.raises(ValueError, match="square bool"):
        check_mask(mask.float())
