"""``minimoe train``: a training run from a preset into a run folder, or the continuation of one (``--resume``).

A run folder holds the checkpoint and ``trainer_state.pt`` (``minimoe.data.train``). Starting over a folder that
holds a run, resuming one that holds none, or starting in a folder that holds other files (a checkpoint without
its run, say) is refused with the flag that fixes it; a resumed run keeps its
own preset, seed and bf16 and trains ``--steps`` more.
"""
from __future__ import annotations

from pathlib import Path

from minimoe.arguments import output_dir


def train_command(args) -> int:
    """Run ``minimoe train`` with its parsed ``args`` (out, preset, seed, steps, bf16, device, resume); returns the
    exit status. Raises ValueError (one line naming the flag) for an --out that is a file, a --resume without a
    run or a run without --resume, a folder that holds other files (a checkpoint, say) and no run, settings that
    contradict the run being resumed, or --device cuda without a GPU."""
    from minimoe.data.train import summarise, train  # at call time
    from minimoe.data.train_config import preset, resume_settings, resume_step

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; expected a run folder")
    started = (Path(args.out) / "trainer_state.pt").is_file()
    if args.resume and not started:
        raise ValueError(f"--resume: {args.out} holds no run to resume (no trainer_state.pt); drop --resume to "
                         f"start a new run there")
    if started and not args.resume:
        raise ValueError(f"--out {args.out} holds a training run (trainer_state.pt): pass --resume to continue it, "
                         f"or another --out for a new run")
    if not started and Path(args.out).is_dir() and any(Path(args.out).iterdir()):
        raise ValueError(f"--out {args.out} holds files but no training run (no trainer_state.pt): a new run would "
                         "write over them; give a new or empty folder")
    name, seed, bf16, steps = args.preset or "tiny", args.seed, args.bf16 or None, args.steps
    try:
        if args.resume:  # the run's own preset, seed and bf16; --steps more than it has done
            name, seed, bf16, steps = resume_settings(args.out, args.preset, args.seed, args.bf16, args.steps)
        model_config, train_config = preset(name, out_dir=args.out, steps=steps, device=args.device, seed=seed,
                                            bf16=bf16)
        if args.resume:
            resume_step(train_config)
    except ValueError as error:
        raise ValueError(f"--resume: {error}" if args.resume else str(error)) from None
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is visible to torch on this machine")
    with output_dir("--out", args.out):
        log = train(model_config, train_config, resume=args.resume)
    print(summarise(log))
    print(f"checkpoint: {train_config.out_dir}")
    return 0
