"""Float32 matrix products on oneDNN's kernels, where they are exact float32.

torch multiplies float32 matrices on x86 with MKL, which on CPUs that are not Intel's runs its
AVX2 code: on the development machine (AMD EPYC, AVX-512) a 2048x2048 product reaches about
175 GFLOP/s on two cores where oneDNN, which ships inside torch and picks its kernels by
instruction set, reaches about 420. torch sends float32 products to oneDNN only while
``torch.backends.mkldnn.matmul.fp32_precision`` is "bf16", a setting that *permits* oneDNN to round
the inputs to bfloat16; whether it does depends on the CPU (with Intel AMX it does; with AVX-512
alone, here, it runs its float32 kernel). So the batched step takes that route only for product
shapes for which a probe on random inputs matches a float64 reference to float32 accuracy (a
bfloat16 product misses it by about 100x), and only while the step runs: the setting is
restored after every step, so no other code in the process sees it.

Only products of at least ``MIN_ROUTED_MACS`` multiply-adds per call take the route: a oneDNN call
costs about 16 us before it computes anything, so small products (an MLP's 10-class output layer)
are 1.5-4x faster on MKL (``routes``).

``runtime.onednn: false`` (``enabled_as(False)``) keeps every product on torch's default.
The switch is process-wide: code running torch products in another thread during a batched step
would see it too (the simulator trains in its own thread only)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

_getter = getattr(torch._C, "_get_fp32_precision_getter", None)
_setter = getattr(torch._C, "_set_fp32_precision_setter", None)

#: A product is exact float32 when its largest error against float64 is below this share of its
#: largest value (float32 products of these sizes: ~1e-6; bfloat16 inputs: ~1e-3).
TOLERANCE = 1e-4

_enabled = True
#: (form, then shape + strides of a, b and out, batch cut to 2) -> whether the oneDNN route
#: computes that product in float32
_verdicts: dict[tuple, bool] = {}
#: the same verdicts by the tensors' full sizes and strides (bounded: ragged rounds vary them)
_by_size: dict[tuple, bool] = {}
_MAX_SIZES = 4096

#: Multiply-adds per call from which a product goes to oneDNN. Measured on the development VM over
#: stacks of 4-256 products of 10x32 to 200x784 matrices (batches of 8-64): below about 2 million
#: MKL was faster in nearly every case (up to 6x at the smallest), above about 8 million oneDNN
#: in most (up to 2.5x); between, they were within 30% of each other.
MIN_ROUTED_MACS = 4_000_000


def available() -> bool:
    """Whether this torch has the switch (2.9 and later) and oneDNN."""
    return _getter is not None and _setter is not None and torch.backends.mkldnn.is_available()


def enabled() -> bool:
    return _enabled and available()


@contextmanager
def enabled_as(on: bool) -> Iterator[None]:
    """Route products (where exact) inside the block, or not; the previous setting after it."""
    global _enabled
    before = _enabled
    _enabled = bool(on)
    try:
        yield
    finally:
        _enabled = before


def begin() -> str:
    """Send float32 products to oneDNN (callers check ``exact`` first); returns what ``end`` restores."""
    before = _getter("mkldnn", "matmul")  # type: ignore[misc]
    _setter("mkldnn", "matmul", "bf16")  # type: ignore[misc]
    return before


def end(before: str) -> None:
    _setter("mkldnn", "matmul", before)  # type: ignore[misc]


@contextmanager
def route() -> Iterator[None]:
    """``begin`` ... ``end`` around the block."""
    before = begin()
    try:
        yield
    finally:
        end(before)


def exact(products: Sequence[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]) -> bool:
    """Whether oneDNN computes every product in float32: each is (form, a, b, out) with ``form``
    "matmul" (``torch.matmul(a, b, out=out)``) or "baddbmm" (``out.baddbmm_(a, b)``), judged by
    the tensors' matrix shapes and strides (never their values), probed once per process on two
    matrices of each (so a probe costs what two clients' products cost, whatever the stack size:
    oneDNN picks a kernel by data type, instruction set and matrix shape, not by batch size)."""
    if not enabled():
        return False
    for form, a, b, out in products:
        if a.dtype != torch.float32 or b.dtype != torch.float32:
            return False
        # A step shape comes back every group: its exact sizes find the verdict without rebuilding
        # the probe's key (several microseconds per product, on every new binding).
        seen = (form, a.shape, a.stride(), b.shape, b.stride(), out.shape, out.stride())
        verdict = _by_size.get(seen)
        if verdict is None:
            metas = tuple(_probe_meta(t) for t in (a, b, out))
            key = (form, *metas)
            verdict = _verdicts.get(key)
            if verdict is None:
                verdict = _verdicts[key] = _probe(form, *metas)
            if len(_by_size) >= _MAX_SIZES:
                _by_size.clear()
            _by_size[seen] = verdict
        if not verdict:
            return False
    return True


Meta = tuple[tuple[int, ...], tuple[int, ...]]


def routes(products: Sequence[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[bool]:
    """Per product (as ``exact`` takes them), whether it goes to oneDNN: exact float32 there and at
    least ``MIN_ROUTED_MACS`` multiply-adds (batch x rows x inner x columns). Decided by shapes
    alone, so the same run takes the same routes."""
    return [
        out.numel() * a.shape[-1] >= MIN_ROUTED_MACS and exact([(form, a, b, out)])
        for form, a, b, out in products
    ]


def select(on: bool, before: str) -> None:
    """Inside ``begin`` ... ``end(before)``: the next products go to oneDNN if ``on``, else run
    under the caller's setting ``before`` (torch's default products unless the caller chose
    otherwise)."""
    _setter("mkldnn", "matmul", "bf16" if on else before)  # type: ignore[misc]


def _probe_meta(t: torch.Tensor) -> Meta:
    """(shape, strides) with every batch dimension cut to at most 2."""
    shape = tuple(min(n, 2) if d < t.dim() - 2 else n for d, n in enumerate(t.shape))
    return shape, tuple(t.stride())


def _like(meta: Meta, gen: torch.Generator | None) -> torch.Tensor:
    """A tensor of that shape and strides (random normal values when ``gen`` is given)."""
    shape, stride = meta
    size = sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) + 1 if all(shape) else 0
    flat = torch.randn(size, generator=gen) if gen is not None else torch.zeros(size)
    return flat.as_strided(shape, stride)


def _routed(form: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    with torch.no_grad(), route():
        if form == "matmul":
            torch.matmul(a, b, out=out)
        else:
            out.baddbmm_(a, b)


def _probe(form: str, a: Meta, b: Meta, out: Meta, run: Callable = _routed) -> bool:
    gen = torch.Generator().manual_seed(0)  # its own stream: the run's random numbers are untouched
    pa, pb, po = _like(a, gen), _like(b, gen), _like(out, None)
    run(form, pa, pb, po)
    ref = torch.matmul(pa.double(), pb.double())
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return scale == 0.0 or float((po.double() - ref).abs().max()) <= TOLERANCE * scale


def verdicts() -> dict[tuple, bool]:
    """The probes so far: (form, then shape + strides of a, b and out) -> exact float32."""
    return dict(_verdicts)


def clear() -> None:
    """Forget the probes (tests)."""
    _verdicts.clear()
    _by_size.clear()
