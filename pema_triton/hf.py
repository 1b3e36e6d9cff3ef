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

from .errors import PemaError
from .handle import get_handle
from .ops.remap import validate_used_ids
from .replace import restore_embeddings
from .trainers import compact_trainer, trainer_used_ids
from .wrappers import is_peft_model, route_peft_saves

__all__ = ["PemaCallback", "UsedVocabularyCollator", "compact_trainer", "original_id_predictions", "trainer_used_ids"]


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
        time_steps: time each optimizer step, which synchronises CUDA at its start and end; False keeps the steps
            free of host syncs (the bad-id check is then the only sync, at each log, save and the end).

    At each log, save and the end of training it runs `handle.check_ids()`: a forward that looked up an id the
    compacted model holds no row for raises there at the latest (see :mod:`pema_triton.id_check`).

    Attributes (after training): step_times (seconds per optimizer step, CUDA-synchronised), peak_cuda_bytes
    (None on CPU), training_state (bytes of weights and buffers, gradients and optimizer state at the end).
    """

    def __init__(self, restore: bool = True, time_steps: bool = True):
        self.restore, self.time_steps = restore, time_steps
        self.step_times: list[float] = []
        self.peak_cuda_bytes: int | None = None
        self.training_state: dict[str, int] = {}
        self.handle_summary: dict | None = None
        self._start = None
        self._restored = None  # the model this callback restored at the end of a run

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Compacted first, then wrapped by `peft.get_peft_model`: PEFT froze the compact rows after
        replace_embeddings returned. The Trainer builds its optimizer in train(), so they can still join it: made
        trainable again where their original trained, and kept in the adapters the PeftModel saves."""
        handle = get_handle(model) if model is not None else None
        if handle is not None and optimizer is None and is_peft_model(model):
            route_peft_saves(model, embedding_layers=handle.train_compact_rows(where_the_original_trained=True) > 0)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and model is self._restored and get_handle(model) is None:
            raise PemaError(
                "this PemaCallback restored the model when the previous train() ended, so it is no longer compacted "
                "and would train every row; call replace_embeddings(model, used_ids) again and build a new Trainer "
                "(its optimizer must hold the new compact rows), or pass PemaCallback(restore=False)"
            )
        handle = get_handle(model) if model is not None else None
        if handle is not None and handle.output_mode.logits_over_used_ids and args.label_smoothing_factor > 0:
            raise PemaError(
                "label_smoothing_factor > 0 with output='restricted': the Trainer's label smoother reads the logits "
                "with original-id labels, but restricted logits have U columns; use output='frozen', or smooth in "
                "your own compute_loss with handle.labels_to_columns(labels)"
            )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.handle_summary = handle.summary() if handle is not None else None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.time_steps:
            self._sync()
            self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.time_steps and self._start is not None:
            self._sync()
            self.step_times.append(time.perf_counter() - self._start)

    @staticmethod
    def _check_ids(model) -> None:
        handle = get_handle(model) if model is not None else None
        if handle is not None:
            handle.check_ids()

    def on_log(self, args, state, control, model=None, **kwargs):
        self._check_ids(model)

    def on_save(self, args, state, control, model=None, **kwargs):
        self._check_ids(model)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._check_ids(model)
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
                self._restored = model

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


class UsedVocabularyCollator:
    """Wraps a masked-LM collator so its random replacement tokens come from the used ids.

    `DataCollatorForLanguageModeling(mlm=True)` replaces some masked tokens with random ids drawn from the whole
    vocabulary, which a compacted model does not hold (`UnusedIdError` on the first batch). This wrapper re-draws,
    uniformly from `used_ids`, every input id that is not a used id at a position the collator chose to predict
    (`labels != -100`): the result is a uniform draw over the used ids (each used id keeps its 1/V chance and gets
    an equal share of the (V - U)/V that fell outside). An unused id anywhere else is left alone, so data the
    scan missed still raises.

    Args:
        collator: the wrapped collator (any callable returning a batch with "input_ids" and "labels").
        used_ids: the ids the model was compacted with (`get_handle(model).used_ids`).
        ignore_index: the label of positions that are not predicted.

    Examples:
        >>> collator = UsedVocabularyCollator(DataCollatorForLanguageModeling(tokenizer), used_ids)
    """

    def __init__(self, collator, used_ids, ignore_index: int = -100):
        self.collator, self.ignore_index = collator, ignore_index
        self.used_ids = validate_used_ids(used_ids, vocab_size=2**62)  # any V: the ids only need to be valid
        self._is_used = torch.zeros(int(self.used_ids.max()) + 1, dtype=torch.bool)
        self._is_used[self.used_ids] = True

    def __call__(self, examples):
        batch = self.collator(examples)
        ids, labels = batch["input_ids"], batch["labels"]
        in_table = (ids >= 0) & (ids < self._is_used.numel())
        used = in_table & self._is_used[ids.clamp(0, self._is_used.numel() - 1)]
        redraw = (labels != self.ignore_index) & ~used
        if bool(redraw.any()):
            generator = getattr(self.collator, "generator", None)
            picks = torch.randint(self.used_ids.numel(), (int(redraw.sum()),), generator=generator)
            ids = ids.clone()
            ids[redraw] = self.used_ids[picks].to(ids.dtype)
            batch["input_ids"] = ids
        return batch


def original_id_predictions(logits: torch.Tensor, labels: torch.Tensor | None = None, *, model) -> torch.Tensor:
    """Argmax predictions as original token ids, for `Trainer(preprocess_logits_for_metrics=...)`.

    With `output="restricted"` the logits have U columns and their argmax is a compact column, which compared with
    original-id labels gives wrong metrics; this maps it back. Full-vocabulary logits pass through as their argmax.
    Bind the model with `functools.partial(original_id_predictions, model=model)`.
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    predictions = logits.argmax(-1)
    handle = get_handle(model)
    if handle is not None and handle.output_mode.logits_over_used_ids:
        return handle.columns_to_ids(predictions)
    return predictions
