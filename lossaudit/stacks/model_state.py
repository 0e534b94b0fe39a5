"""The model as it was before a user's code ran on it, put back afterwards.

A user's step (``--step``) may do what a real loop does: apply an optimizer update, cast the
model (``model.half()``), freeze or unfreeze parameters, add a module or a hook, switch to
``eval()``. Every later layout and path must see the model the audit built, so ``ModelState``
records, once per run of a path, each module's attribute dictionaries (parameters, buffers,
submodules, hooks, train flag) and each parameter's and buffer's tensor object, storage,
values (copied to the CPU) and ``requires_grad``; ``restore`` puts all of it back.

What it costs: one CPU copy of the parameters and buffers per run of a path, and one copy back
per restore (version counters cannot tell: ``p.data -= ...`` changes values without one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Tensor:
    obj: torch.Tensor  # the Parameter (or buffer tensor) itself
    data: torch.Tensor  # its storage as the model computed with it (dtype, device, shape)
    values: torch.Tensor  # a CPU copy of its values
    requires_grad: bool


class ModelState:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules: list[tuple[torch.nn.Module, dict, list[tuple[dict, dict]]]] = []
        self.tensors: list[_Tensor] = []
        with torch.no_grad():
            for module in model.modules():
                attrs = dict(vars(module))
                containers = [(v, dict(v)) for v in attrs.values() if isinstance(v, dict)]
                self.modules.append((module, attrs, containers))
                for tensor in (*module._parameters.values(), *module._buffers.values()):
                    if tensor is not None:
                        data = tensor.detach()
                        self.tensors.append(_Tensor(tensor, data, data.to("cpu", copy=True), tensor.requires_grad))

    def restore(self) -> None:
        """Every module, parameter and buffer as recorded; no gradients left."""
        with torch.no_grad():
            for module, attrs, containers in self.modules:
                for container, items in containers:
                    container.clear()
                    container.update(items)
                extra = set(vars(module)) - set(attrs)
                for name in extra:
                    del vars(module)[name]
                vars(module).update(attrs)
            for t in self.tensors:
                t.obj.data = t.data
                t.data.copy_(t.values)
                if isinstance(t.obj, torch.nn.Parameter):
                    t.obj.requires_grad_(t.requires_grad)
                    t.obj.grad = None
