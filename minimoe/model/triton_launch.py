"""Launch a compiled Triton kernel with less host work than ``kernel[grid](...)``.

A Triton launch from Python does two things. First it binds the arguments and works out their
*specialisation*: each tensor's dtype and whether its address is a multiple of 16 bytes, each integer's width
and whether it equals 1 or is a multiple of 16. With these and the ``tl.constexpr`` values it finds the compiled
kernel in its cache. Then it calls the kernel's launcher, ``CompiledKernel.run``. At decode size the GPU spends
a few µs on a kernel and the host more than that on its launch, so the host sets the pace.

:func:`launch` keeps its own dictionary from a key to the compiled kernel. The key holds the kernel, the
current device, the same per-argument properties and the ``constexpr`` values. Then it calls ``run`` directly.
The first call with a new key goes through Triton (``JITFunction.warmup``), which compiles or finds the kernel,
so Triton alone decides every specialisation. The key only has to tell apart every case that Triton tells
apart; ``tests/test_gpu_paths.py`` checks that the kernel it picks is the one ``warmup`` returns.
PyTorch's Inductor launches its Triton kernels through ``run`` in the same way. On one H100 host this took a
launch from 37.7 to 30.2 µs of host time, an eager dispatch + combine 37-53 µs faster and the MoE layer's forward
at 512 tokens 39 µs (``benchmarks/results/triton_launch_host_h100.md``).

It falls back to ``kernel[grid](...)`` when a launch hook is set (a profiler such as Proton wants to see every
launch), for a kernel Triton interprets (``TRITON_INTERPRET=1``), and on Triton releases whose ``run`` takes
other arguments (before 3.5).
"""
from __future__ import annotations

import torch

try:  # Triton is optional: callers check for it before they launch anything
    import triton
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
except ImportError:
    triton = knobs = driver = JITFunction = None

_FAST = triton is not None and tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 5)
_COMPILED: dict[tuple, tuple] = {}  # key -> what ``_compile`` returns
_STREAM: list = []  # Triton's function for the current stream's handle on a device, looked up on first launch
_INT32, _INT64 = 1 << 31, 1 << 63


def _key(args: tuple) -> tuple:
    """What Triton specialises the arguments on, or more: a tensor's dtype and 16-byte alignment; an integer's
    == 1, divisibility by 16, and width (32 bits, signed 64, unsigned 64); a float its type; anything else (bools,
    None) itself. One comprehension with no call per argument: this runs on every launch. A tensor subclass (an
    ``nn.Parameter``) counts as a tensor: its dtype and address can change under the same object."""
    return tuple([(a.dtype, not a.data_ptr() & 15) if isinstance(a, torch.Tensor) else
                  (a == 1, not a & 15, -_INT32 <= a < _INT32, a < _INT64) if type(a) is int else
                  (float,) if type(a) is float else (type(a), a) for a in args])


def _cache_key(kernel, device: int, args: tuple, constexprs: dict) -> tuple:
    return kernel, device, _key(args), tuple(constexprs.items())


def _hooked(hook) -> bool:
    """Whether a launch hook is set: a function, or a chain of them (Triton 3.5 on) that is not empty."""
    return bool(getattr(hook, "calls", hook))


def _compile(kernel, grid: tuple, args: tuple, constexprs: dict) -> tuple:
    """Triton compiles the kernel or finds it, deciding its specialisation; returns what a launch passes to
    ``run``: (launcher, function, packed metadata, the values of the parameters after ``args``, the kernel)."""
    compiled = kernel.warmup(*args, grid=grid, **constexprs)
    compiled = compiled.result() if hasattr(compiled, "result") else compiled  # (under asynchronous compilation)
    compiled._init_handles()
    parameters = list(kernel.signature.parameters.values())[len(args):]
    tail = tuple(constexprs[p.name] if p.name in constexprs else p.default for p in parameters)
    return compiled.run, compiled.function, compiled.packed_metadata, tail, compiled


def launch(kernel, grid: tuple, *args, **constexprs) -> None:
    """``kernel[grid](*args, **constexprs)`` with less host work (see the module docstring): ``args`` the
    kernel's leading parameters in order, ``constexprs`` every later one by name (defaults apply) and launch
    options (``num_warps``...); ``grid`` one to three program counts. On the current CUDA device and stream,
    like Triton's own launch."""
    # (under TRITON_INTERPRET=1 the kernel is an interpreted function, not a JITFunction)
    if not _FAST or not isinstance(kernel, JITFunction) or _hooked(knobs.runtime.launch_enter_hook) \
            or _hooked(knobs.runtime.launch_exit_hook):
        kernel[grid](*args, **constexprs)
        return
    device = torch.cuda.current_device()
    key = _cache_key(kernel, device, args, constexprs)
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = _compile(kernel, grid, args, constexprs)
    run, function, metadata, tail, _ = compiled
    grid = (*grid, 1, 1)
    if not _STREAM:
        _STREAM.append(driver.active.get_current_stream)
    run(grid[0], grid[1], grid[2], _STREAM[0](device), function, metadata, None, None, None, *args, *tail)


def compiled_for(kernel, *args, **constexprs):
    """The ``CompiledKernel`` that :func:`launch` used for these arguments on the current device (for tests),
    or None when it has not launched them through ``run``."""
    compiled = _COMPILED.get(_cache_key(kernel, torch.cuda.current_device(), args, constexprs))
    return None if compiled is None else compiled[4]
