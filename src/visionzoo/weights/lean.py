"""Building a model for its weights without a throw-away random initialisation.

The normal way to get a pre-trained model allocates and randomly initialises every
parameter, reads the checkpoint into a second copy, then copies it over: twice the
weights in memory and seconds of wasted initialisation. Here instead:

1. **Parameters on the meta device, buffers for real.** While the model is built, a
   parameter registration hook (`torch.nn.modules.module.register_module_parameter_
   registration_hook`, active only in the building thread) swaps every new parameter for
   a meta tensor: shape and dtype, no storage, and the family's init code runs on it as a
   no-op. Buffers are created normally, so everything a model computes for itself
   (BatchNorm's `num_batches_tracked`, relative-position indices, non-persistent tables)
   is correct without any help from the family.
2. **Assign, do not copy.** `load_state_dict(..., assign=True)` makes the checkpoint's
   tensors the parameters. Checkpoints are memory-mapped (`weights/io.py`), so the
   parameters *are* the file's pages: peak memory stays close to one copy of the weights.
3. **Nothing left on meta.** After loading, any tensor still on the meta device (a
   parameter the checkpoint lacks) means the lean path cannot give the same model, and
   the caller builds it the normal way instead (`LeftOnMeta`). A model whose build fails
   under the hook is also built normally.

What family authors must know (the lean result must be bit-identical to the normal one,
and `tests/test_lean.py` checks every registered architecture):
- Create parameters as `nn.Parameter`s assigned to modules (the usual way); their values
  at build time are discarded when weights follow.
- Do not derive buffers from parameter values in `__init__` (parameters have no values
  there); compute buffers from configuration (sizes, indices), as usual.
- `adapt_state_dict` runs on the meta-built model: use shapes and attributes, not
  parameter values.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import torch
from torch import nn

log = logging.getLogger("visionzoo")

_local = threading.local()
_hook_lock = threading.Lock()
_hook_users = 0
_hook_handle = None


class LeftOnMeta(RuntimeError):
    """Tensors still on the meta device after loading: build the model normally instead."""

    def __init__(self, names: list[str]):
        super().__init__(f"{len(names)} tensors not in the checkpoint: {', '.join(names[:5])}")
        self.names = names


# In-place operations that only set values; on a meta tensor (no values) they do nothing.
_FILL_OPS = frozenset({
    "normal_", "uniform_", "zero_", "fill_", "copy_", "add_", "sub_", "mul_", "div_", "clamp_", "clamp_min_",
    "clamp_max_", "erfinv_", "exponential_", "bernoulli_", "random_", "log_normal_", "cauchy_", "geometric_",
    "addcmul_", "addcdiv_", "abs_", "neg_", "sqrt_", "exp_", "log_", "pow_", "masked_fill_", "index_fill_",
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
})


class _SkipFillsOnMeta(torch.overrides.TorchFunctionMode):
    """Skips value-setting operations (`nn.init.*`, `normal_`, ...) on meta tensors.

    Why: they are no-ops there, but the first of some (`normal_`, `add_`) imports torch's
    Python meta kernels (torch._dynamo, sympy), which costs seconds per process.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        target = args[0] if args else (kwargs or {}).get("tensor")  # nn.init passes `tensor=` by keyword
        if isinstance(target, torch.Tensor) and target.is_meta and (
                getattr(func, "__module__", None) == "torch.nn.init" or getattr(func, "__name__", "") in _FILL_OPS):
            return None if func.__name__ == "__setitem__" else target
        return func(*args, **(kwargs or {}))


def _parameter_to_meta(module: nn.Module, name: str, param: nn.Parameter | None):
    if not getattr(_local, "active", False) or param is None or param.is_meta:
        return None
    if isinstance(param, nn.parameter.UninitializedParameter):  # lazy modules: nothing to skip
        return None
    return nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within this block (in this thread), new module parameters are meta tensors."""
    global _hook_users, _hook_handle
    with _hook_lock:
        if _hook_users == 0:
            _hook_handle = nn.modules.module.register_module_parameter_registration_hook(_parameter_to_meta)
        _hook_users += 1
    previous = getattr(_local, "active", False)
    _local.active = True
    try:
        with _SkipFillsOnMeta():
            yield
    finally:
        _local.active = previous
        with _hook_lock:
            _hook_users -= 1
            if _hook_users == 0 and _hook_handle is not None:
                _hook_handle.remove()
                _hook_handle = None


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def build_lean(build: Callable[[], ModuleT]) -> tuple[ModuleT, bool]:
    """`(model, lean)`: the model with its parameters on the meta device (`lean` True), or,
    if the family's code cannot run that way, built normally (`lean` False)."""
    try:
        with parameters_on_meta():
            return build(), True
    except Exception as e:  # noqa: BLE001 - any failure: fall back to the normal build
        log.debug("building on the meta device failed (%s: %s); building normally", type(e).__name__, e)
        return build(), False


def build_meta(build: Callable[[], ModuleT]) -> ModuleT:
    """The model entirely on the meta device (buffers too): only for its keys and shapes."""
    with torch.device("meta"), _SkipFillsOnMeta():
        return build()


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers (persistent or not) still on the meta device."""
    return [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]


def load_assign(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Make the checkpoint's tensors the model's (no copy), for the keys whose shapes fit.

    A tensor whose dtype differs is converted, and a non-contiguous one made contiguous,
    exactly what copying into a normally built model gives. Raises `LeftOnMeta` if
    parameters or buffers are still on the meta device afterwards.
    """
    own = model.state_dict(keep_vars=True)
    fitted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        target = own.get(key)
        if target is None or target.shape != value.shape:
            continue
        if value.dtype != target.dtype:
            value = value.to(target.dtype)
        fitted[key] = value.contiguous()
    model.load_state_dict(fitted, strict=False, assign=True)
    left = meta_tensors(model)
    if left:
        raise LeftOnMeta(left)
