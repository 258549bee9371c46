"""A model's state: eval mode that restores everything, its device, its fingerprint."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
from typing import Any

import torch
from torch import nn

__all__ = ["code_digest", "eval_mode", "hash_tensor", "model_device", "model_fingerprint"]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every module in eval mode; on exit restore each module's own flag and every
    buffer (the same tensor object, its values bit for bit), so a forward that updates a
    buffer (a counter, running statistics) leaves no trace."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(m, name, b, b.detach().clone()) for m in model.modules()
               for name, b in m._buffers.items() if b is not None]
    try:
        model.eval()
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for m, name, b, saved in buffers:
                m._buffers[name] = b
                if b.shape != saved.shape or b.dtype != saved.dtype:
                    b.data = saved
                else:
                    b.copy_(saved)


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer; None when it has neither."""
    for p in itertools.chain(model.parameters(), model.buffers()):
        return p.device
    return None


def model_fingerprint(model: nn.Module) -> str:
    """A hash of everything a module's activations depend on, besides the data.

    Covers each module's path, type, hyper-parameters (``extra_repr``), the code of its
    ``forward`` (the class's, or one set on the instance), and every parameter *and buffer* (name, dtype, shape, bytes): retrained or permuted
    weights, changed BatchNorm statistics, ``.double()`` or an edited ``forward`` all
    change it. SHA-256 (OpenSSL's, with the CPU's SHA instructions where it has them: the
    weights are most of the bytes), the first 128 bits in hex.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for path, module in model.named_modules():
            h.update(f"{path}:{type(module).__module__}.{type(module).__qualname__};".encode())
            h.update(module.extra_repr().encode())
            forward = vars(module).get("forward", type(module).forward)
            h.update(code_digest(forward).encode())
            for kind, tensors in (("p", module.named_parameters(recurse=False)), ("b", module.named_buffers(recurse=False))):
                for name, t in tensors:
                    hash_tensor(h, f"{kind}:{name}", t)
    return h.hexdigest()[:32]


def hash_tensor(h, label: str, t: torch.Tensor) -> None:
    """Feed ``label``, dtype, shape and the bytes of ``t`` (any dtype, layout, device) to ``h``."""
    h.update(f"{label}:{t.dtype}:{tuple(t.shape)};".encode())
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.detach()
    if not (t.is_cpu and t.is_contiguous()):
        t = t.reshape(-1).cpu().contiguous()
    h.update(t.view(-1).view(torch.uint8).numpy() if t.numel() else b"")  # (the buffer itself: no copy)


def code_digest(fn: Any) -> str:
    """A hash of a function's code: bytecode, constants (nested code too), names and
    closure values; the same for the same source, different after an edit."""
    h = hashlib.blake2b(digest_size=16)
    fn = getattr(fn, "__func__", fn)
    if isinstance(fn, functools.partial):
        h.update(repr((fn.args, sorted(fn.keywords.items()))).encode())
        fn = fn.func
    code = getattr(fn, "__code__", None)
    if code is None:
        h.update(f"{type(fn).__module__}.{getattr(fn, '__qualname__', type(fn).__qualname__)}".encode())
        return h.hexdigest()
    stack = [code]
    while stack:
        c = stack.pop()
        h.update(c.co_code)
        h.update(repr(c.co_names).encode())
        for const in c.co_consts:
            if hasattr(const, "co_code"):
                stack.append(const)
            else:
                h.update(repr(const).encode())
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        h.update((code_digest(value) if callable(value) else repr(value)).encode())
    return h.hexdigest()
