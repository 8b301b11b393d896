"""Per-model bound on in-flight requests: past it, 429 with Retry-After instead of queueing forever.

A model admits `max_num_seqs + max_queue` sequences at once (the batch the engine runs plus `max_queue`
waiting; `max_queue` defaults to `max_num_seqs`). A request holds `n` slots (times the number of prompts of a
batched completion; a /tokenize request holds one) from admission until its response has been sent completely
or the client went away: the route acquires, middleware/admission.py releases when the ASGI call returns,
whatever happened in between. A request that needs more slots than the limit can never run and gets 400.
"""

from __future__ import annotations

from dataclasses import dataclass


def admission_limit(max_num_seqs: int, max_queue: int | None) -> int:
    """The batch plus the queue; the default queue is one batch deep (a request waits for about one other)."""
    return max_num_seqs + (max_num_seqs if max_queue is None else max_queue)


class Slot:
    """Slots held by one request; release() is idempotent."""

    __slots__ = ("_gate", "n")

    def __init__(self, gate: AdmissionGate, n: int):
        self._gate: AdmissionGate | None = gate
        self.n = n

    def release(self, completed: bool = True) -> None:
        """completed=False: the response was cut off (client went away mid-stream) or ended in an engine error."""
        if self._gate is not None:
            self._gate.in_flight -= self.n
            self._gate.incomplete += not completed
            self._gate = None


@dataclass
class AdmissionGate:
    limit: int
    in_flight: int = 0
    rejected: int = 0  # answered 429
    incomplete: int = 0  # admitted, response not sent to its end or ended in an engine error

    def try_acquire(self, n: int = 1) -> Slot | None:
        """Slots for n sequences, or None (429) while they do not fit; n > limit never fits (the caller's 400)."""
        n = max(1, n)
        if self.in_flight + n > self.limit:
            self.rejected += 1
            return None
        self.in_flight += n
        return Slot(self, n)


def request_slots(request) -> int:
    """Sequences a completion/chat request will occupy in the engine (1 for anything else, e.g. /tokenize)."""
    n = getattr(request, "n", None) or 1
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        n *= len(prompt)  # a batch of prompts (strings or token lists)
    return max(1, int(n))
