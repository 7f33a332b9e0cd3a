"""``n > 1``: a request's choices as one group of scheduler requests sharing the prompt's KV.

Choice 0 is the request itself. The other choices wait here, out of the scheduler, until
choice 0 has computed the prompt and registered its full blocks in the prefix cache; then
they are queued, and admission hands them those blocks by reference count (no copy, no
recompute). Each choice writes its own copy of the last, partial prompt block (recomputing
its < ``page_size`` tokens: copy-on-write at block granularity) and samples its own stream.
With the prefix cache off the choices recompute the whole prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokencake.outputs import RequestOutput
from tokencake.scheduler.request import Request


@dataclass
class ChoiceGroup:
    request_id: str  # the id every choice's outputs report
    members: list[str]  # scheduler request ids, by choice index (members[0] == request_id)
    pending: list[Request]  # choices 1.. not yet handed to the scheduler
    finished: set[int] = field(default_factory=set)


class ChoiceGroups:
    """Bookkeeping of every ``n > 1`` request of one engine."""

    def __init__(self) -> None:
        self._groups: dict[str, ChoiceGroup] = {}
        self._member: dict[str, tuple[ChoiceGroup, int]] = {}

    @staticmethod
    def member_id(request_id: str, index: int) -> str:
        return request_id if index == 0 else f"{request_id}#{index}"

    def add(self, request_id: str, children: list[Request]) -> None:
        ids = [request_id] + [c.request_id for c in children]
        group = ChoiceGroup(request_id, ids, list(children))
        self._groups[request_id] = group
        for i, rid in enumerate(ids):
            self._member[rid] = (group, i)

    def __len__(self) -> int:
        return len(self._groups)

    def relabel(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Report choices under their request's id with ``index`` and ``choices_left``
        (every output of a step, error outputs included, so a failed choice still counts)."""
        for out in outputs:
            rid, index = self.public(out.request_id)
            if out.finished:
                out.choices_left = self.finish(out.request_id)
            out.request_id, out.index = rid, index
        return outputs

    def public(self, member_id: str) -> tuple[str, int]:
        """``(request id the outputs report, choice index)`` of a scheduler request id."""
        entry = self._member.get(member_id)
        return (member_id, 0) if entry is None else (entry[0].request_id, entry[1])

    def release(self, member_id: str) -> list[Request]:
        """Choices to queue now that ``member_id`` produced a token (once, for choice 0)."""
        entry = self._member.get(member_id)
        if entry is None or entry[1] != 0 or not entry[0].pending:
            return []
        pending, entry[0].pending = entry[0].pending, []
        return pending

    def finish(self, member_id: str) -> int:
        """Mark a choice finished; returns how many choices of its request are still running."""
        entry = self._member.get(member_id)
        if entry is None:
            return 0
        group, index = entry
        group.finished.add(index)
        left = len(group.members) - len(group.finished)
        if left == 0:
            self.drop(group.request_id)
        return left

    def members(self, request_id: str) -> list[str]:
        """Scheduler ids of every choice of ``request_id`` (just itself without a group)."""
        group = self._groups.get(request_id)
        return [request_id] if group is None else list(group.members)

    def drop(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        if group is not None:
            for rid in group.members:
                self._member.pop(rid, None)
