"""Per-model bound on in-flight generation requests: past it, 429 with Retry-After instead of queueing forever.

A model admits `max_num_seqs + max_queue` requests at once (the batch the engine runs plus `max_queue` waiting);
`max_queue` None means unbounded. A request holds `n` slots (times the number of prompts of a batched
completion) from admission until its response has been sent completely or the client went away: the route
acquires, middleware/admission.py releases when the ASGI call returns, whatever happened in between.
"""

from __future__ import annotations

from dataclasses import dataclass


class Slot:
    """Slots held by one request; release() is idempotent."""

    __slots__ = ("_gate", "n")

    def __init__(self, gate: "AdmissionGate", n: int):
        self._gate: AdmissionGate | None = gate
        self.n = n

    def release(self, completed: bool = True) -> None:
        """completed=False: the response was cut off (client went away mid-stream, or an error)."""
        if self._gate is not None:
            self._gate.in_flight -= self.n
            self._gate.incomplete += not completed
            self._gate = None


@dataclass
class AdmissionGate:
    limit: int | None  # None: unbounded
    in_flight: int = 0
    rejected: int = 0  # answered 429
    incomplete: int = 0  # admitted, response not sent to its end

    def try_acquire(self, n: int = 1) -> Slot | None:
        n = max(1, n)
        # A request larger than the whole limit would never fit; admit it alone rather than reject it forever.
        if self.limit is not None and self.in_flight + n > self.limit and self.in_flight > 0:
            self.rejected += 1
            return None
        self.in_flight += n
        return Slot(self, n)


def request_slots(request) -> int:
    """Sequences a completion/chat request will occupy in the engine."""
    n = getattr(request, "n", None) or 1
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        n *= len(prompt)  # a batch of prompts (strings or token lists)
    return max(1, int(n))
