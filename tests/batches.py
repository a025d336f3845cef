"""Test inputs shared by several test files."""

import torch


def left_padded(lengths, vocab, seed=1, low=1):
    """Random token ids in [low, vocab), left-padded with 0 to the longest length, and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(low, vocab, (len(lengths), width), generator=generator)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    return ids.masked_fill(mask == 0, 0), mask


def run_cli(main, capsys, *argv):
    """Run a command's ``main`` on ``argv`` (stringified): (exit status, stdout, stderr); a SystemExit is a status."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err
