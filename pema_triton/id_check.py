"""The bad-id check of a compacted embedding, without a host sync on the training path.

A lookup counts, on the device, the ids that have no compact row. Reading that count back with `.item()` every
forward blocks the host until the GPU has caught up (the launch queue drains every step), stops CUDA-graph
capture and breaks `torch.compile` graphs. Instead (`check_ids=True`, the default):

- every forward adds its count to a device counter (a buffer; `torch.compile` and CUDA graphs record the add);
- in eager mode on CUDA, the count is also copied to pinned host memory behind a CUDA event, and the next
  forward reads it once the event has completed (`Event.query()`, which never blocks), raising
  :class:`~pema_triton.errors.UnusedIdError` naming the ids. The error arrives a forward or two late: the
  forward that saw the ids embedded them as zeros, and their gradient reached no row, so no trained row is wrong;
- :meth:`BadIdWatch.check` (`handle.check_ids()`, called by `PemaCallback` at each log, save and the end of
  training, points that sync anyway) blocks and raises if the counter is not zero: the way compiled and
  graph-captured steps are checked.

On CPU reading the count costs no sync, so the forward that sees a bad id raises (`check_ids="sync"` does that
on CUDA too, for debugging; `check_ids=False` turns the check off).
"""

from __future__ import annotations

from collections import deque

import torch

from .errors import PemaError, UnusedIdError
from .ops.remap import raise_for_bad_ids

__all__ = ["CHECK_IDS", "BadIdWatch", "LabelCheck", "check_ids_option"]

CHECK_IDS = (True, False, "sync", "async")
# Forwards whose count may be in flight at once. Past this the oldest is waited for: the GPU is then more than
# 4 forwards behind the host, and the ids kept for the error message stay bounded.
_MAX_PENDING = 4


def check_ids_option(check_ids) -> bool | str:
    """Validates a `check_ids=` value: True (asynchronous on CUDA), "sync", "async" (also on CPU) or False."""
    # 1 == True, so `in` alone would take 1 and 0 as well.
    if check_ids not in CHECK_IDS or (isinstance(check_ids, int) and not isinstance(check_ids, bool)):
        raise PemaError(f"check_ids must be one of {CHECK_IDS}, got {check_ids!r}")
    return check_ids


class BadIdWatch:
    """One compacted embedding's forwards whose bad-id count is still on its way to the host.

    The tensors stay with the module (its `bad_id_count` [1] int32 and `remap` [V] buffers, which follow
    `model.to(...)`); they are passed in.
    """

    def __init__(self, what: str = "token ids"):
        self.what = what  # what the ids are, for the error: "token ids" (the embedding's), "labels" (a fused loss's)
        self._pending = deque()  # (event or None, [1] host count, ids) of forwards not yet read, oldest first

    def observe(self, ids: torch.Tensor, num_bad: torch.Tensor, counter: torch.Tensor, remap: torch.Tensor,
                mode: bool | str) -> None:
        """Records one forward's `num_bad` [1] for `ids` into `counter`; raises for an earlier forward that saw
        bad ids, or for this one where reading is free (CPU) or asked for (`mode="sync"`)."""
        counter += num_bad
        if torch.compiler.is_compiling() or (ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            return  # traced or captured: only the device counter, read by check()
        if mode == "sync" or (mode is True and not ids.is_cuda):
            if num_bad.item():
                self._raise(ids, counter, remap)
            return
        while self._pending and (self._pending[0][0] is None or self._pending[0][0].query()):
            self._read_oldest(counter, remap)
        self._pending.append(_snapshot(ids, num_bad))
        if len(self._pending) > _MAX_PENDING:
            self._read_oldest(counter, remap)

    def check(self, counter: torch.Tensor, remap: torch.Tensor) -> None:
        """Blocks until every recorded forward is counted; raises if any looked up an id with no compact row."""
        while self._pending:
            self._read_oldest(counter, remap)
        if counter.item():
            self._raise(None, counter, remap)

    def _read_oldest(self, counter, remap) -> None:
        event, host, ids = self._pending.popleft()
        if event is not None:
            event.synchronize()  # a no-op once query() said so
        if int(host):
            self._raise(ids, counter, remap)

    def _raise(self, ids, counter, remap) -> None:
        # Reported once: the counter and the forwards in flight start afresh for a caller that goes on.
        counter.zero_()
        self._pending.clear()
        if ids is not None:
            raise_for_bad_ids(ids, remap, what=self.what)
        raise UnusedIdError(
            f"a compiled or graph-captured forward was given {self.what} that are not in the used vocabulary (or are "
            "outside [0, V)); run a step eagerly with check_ids='sync' to see which", []
        )

    # Events and pinned buffers belong to one process and stream: a copy (deepcopy, pickle) starts with none.
    def __getstate__(self):
        return {"what": self.what}

    def __setstate__(self, state):
        self.what = state.get("what", "token ids")
        self._pending = deque()


class LabelCheck:
    """Labels a compacted head's loss has no column for (outside [0, V); in `restricted` mode also an unused id),
    counted on the device into the head's `bad_label_count` buffer and reported as bad embedding ids are: at that
    forward on CPU, a forward or two later on CUDA (no host sync), at `handle.check_ids()` when compiled. The
    forward that saw them ignores them, so no step trains on them. Kept on the head as `head.label_check`."""

    def __init__(self, mode: bool | str):
        self.mode, self.watch = mode, BadIdWatch(what="labels")

    @staticmethod
    def mode_for(check_ids: bool | str) -> bool | str:
        """`check_ids=` of replace_embeddings decides how (sync or not), never whether: the model's own loss fails
        on such a label too."""
        return True if check_ids is False else check_ids

    @staticmethod
    def attach(head, mode: bool | str) -> None:
        if "label_check" not in head.__dict__:
            device = head.weight.device
            head.register_buffer("bad_label_count", torch.zeros(1, dtype=torch.int32, device=device), persistent=False)
        head.label_check = LabelCheck(mode)

    @staticmethod
    def detach(head) -> None:
        head._buffers.pop("bad_label_count", None)
        head.__dict__.pop("label_check", None)

    def count(self, head, shown: torch.Tensor, bad: torch.Tensor, remap: torch.Tensor) -> None:
        """Counts the `bad` [*] mask of labels `shown` [*] (ignored ones replaced by a valid id, so the error names
        only the bad); `remap` [V] decides what the error calls them (outside [0, V), or unused)."""
        if self.mode is not False:
            self.watch.observe(shown, bad.sum(dtype=torch.int32).reshape(1), head.bad_label_count, remap, self.mode)

    def check(self, head, remap: torch.Tensor) -> None:
        if self.mode is not False:
            self.watch.check(head.bad_label_count, remap)


def _snapshot(ids: torch.Tensor, num_bad: torch.Tensor):
    """(event, host copy of num_bad, ids): the copy is complete once the event is (None: it already is)."""
    if not num_bad.is_cuda:
        return None, num_bad.clone(), ids
    # The copy runs on the current stream of the count's device, which need not be the current device (a model
    # spread over GPUs by device_map): the event must follow that stream, or query() could pass before the copy.
    stream = torch.cuda.current_stream(num_bad.device)
    host = torch.empty(1, dtype=torch.int32, pin_memory=True)
    host.copy_(num_bad, non_blocking=True)
    event = torch.cuda.Event()
    event.record(stream)
    return event, host, ids
