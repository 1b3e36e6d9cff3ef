"""Hugging Face Trainer integration (imports transformers; `import pema_triton` alone does not).

    handle = replace_embeddings(model, used_ids)
    callback = PemaCallback()
    Trainer(model=model, args=args, train_dataset=train, callbacks=[callback]).train()
    print(callback.summary())   # step time, peak CUDA memory, training-state bytes; the model is restored
"""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback

from .handle import get_handle
from .replace import restore_embeddings

__all__ = ["PemaCallback"]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class PemaCallback(TrainerCallback):
    """Measures a Trainer run and, when it ends, merges a compacted model back (`restore_embeddings`).

    Works on uncompacted models too (it then only measures), so one callback serves the run with and the run
    without PEMA when comparing them.

    Args:
        restore: restore the model's full embeddings at the end of training (so `trainer.save_model()` and
            evaluation after training see the merged model). Checkpoints saved *during* training are already full
            size either way.

    Attributes (after training): step_times (seconds per optimizer step, CUDA-synchronised), peak_cuda_bytes
    (None on CPU), training_state (bytes of weights and buffers, gradients and optimizer state at the end).
    """

    def __init__(self, restore: bool = True):
        self.restore = restore
        self.step_times: list[float] = []
        self.peak_cuda_bytes: int | None = None
        self.training_state: dict[str, int] = {}
        self.handle_summary: dict | None = None
        self._start = None

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        handle = get_handle(model) if model is not None else None
        self.handle_summary = handle.summary() if handle is not None else None

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        if self._start is not None:
            self.step_times.append(time.perf_counter() - self._start)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if torch.cuda.is_available():
            self.peak_cuda_bytes = torch.cuda.max_memory_allocated()
        if model is not None:
            params = list(model.parameters())
            opt_state = [] if optimizer is None else [
                v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim()
            ]
            self.training_state = {
                "weights": _bytes(params + list(model.buffers())),
                "gradients": _bytes(p.grad for p in params),
                "optimizer": _bytes(opt_state),
            }
            if self.restore and get_handle(model) is not None:
                restore_embeddings(model)

    def summary(self) -> dict:
        """Mean step time (first step excluded: warm-up), peak CUDA bytes, training-state bytes, PEMA sizes."""
        steady = self.step_times[1:] or self.step_times
        return {
            "mean_step_seconds": sum(steady) / len(steady) if steady else None,
            "peak_cuda_bytes": self.peak_cuda_bytes,
            "training_state_bytes": sum(self.training_state.values()) if self.training_state else None,
            **{f"{k}_bytes": v for k, v in self.training_state.items()},
            "pema": self.handle_summary,
        }
