"""`ChunkPacker(whole_prompts=True)`: DistServe's prefill batches (the simulator's mode disagg)."""

from tetri.sched.chunking import ChunkPacker


def _chunks(packer):
    out = []
    while len(packer):
        out.append([(p.req_id, p.start, p.num_tokens, p.is_last) for p in packer.next_chunk()])
    return out


def test_whole_prompts_never_split_and_a_long_one_runs_alone():
    packer = ChunkPacker(512, whole_prompts=True)
    for req_id, n in (("a", 300), ("b", 200), ("c", 100), ("d", 900), ("e", 50)):
        packer.add(req_id, n)
    assert _chunks(packer) == [[("a", 0, 300, True), ("b", 0, 200, True)],
                               [("c", 0, 100, True)],
                               [("d", 0, 900, True)],
                               [("e", 0, 50, True)]]
    split = ChunkPacker(512)
    for req_id, n in (("a", 300), ("b", 200), ("c", 100)):
        split.add(req_id, n)
    assert _chunks(split)[0][-1] == ("c", 0, 12, False)  # the default packer fills the chunk
