"""What the engine does when a step raises: the request that caused it fails alone, the others keep running.

A step's forward, sampling, MTP pass and update touch only the requests its plan scheduled (their blocks, their
state slots, their rows), so an exception there is theirs; requests outside the plan carry on untouched.
- Before the scheduler's update (forward, sampling, verify, the MTP pass: nothing applied yet), a step of one
  request fails that request: it ends with FinishReason.ERROR, its blocks and slot freed. A step of several is
  quarantined instead: each of its requests is preempted by recompute and then runs alone until a step of its
  succeeds (Scheduler.quarantine), so the culprit fails by itself on its next try and the rest finish with
  exactly the tokens they would have had (recompute is exact; sampling is counter based).
- In or after the update, two failures are one request's or nobody's: a constrained request whose grammar
  refuses the tokens just appended ends alone with ERROR (its tokens of this step included), and a failure
  while drafting only drops the step's MTP drafts (they are proposals; the requests decode without them).
  Anything else there (the update itself, checkpoint copies) leaves part of the step applied and its outputs
  lost: every request of the plan ends with ERROR, and the prefix index is emptied, because the step may have
  named blocks or taken checkpoints whose device copies never ran (running requests keep their blocks as
  private ones, so nothing they hold changes).

What cannot be attributed is raised for the worker to die and be restarted: a failure while scheduling (before
any request is in a plan), a failure in a tensor-parallel step (the other ranks may be stuck in a collective),
and `MAX_CONSECUTIVE` failing steps in a row (the device itself is broken, e.g. a sticky CUDA error).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch

from qnext.worker.scheduler import Request, SchedulePlan, Scheduler
from qnext.worker.types import StepError

MAX_CONSECUTIVE = 3


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError))


@dataclass
class FailedStep:
    """One failed step: the requests it ended and the exception, for the worker's log."""

    request_ids: list[str]
    error: StepError | None  # None: the requests were quarantined (or only lost their drafts), not ended
    traceback: str
    drafts_only: bool = False  # MTP drafting failed: the requests go on without this step's drafts


@dataclass
class StepFailures:
    attributable: bool  # False under tensor parallelism
    consecutive: int = 0
    failed: list[FailedStep] = field(default_factory=list)  # since the worker last read them (`take`)

    def succeeded(self) -> None:
        self.consecutive = 0

    def fail(self, plan: SchedulePlan, scheduler: Scheduler, e: Exception, applied: bool) -> list[Request]:
        """After the plan's step raised `e` (`applied`: in or after the scheduler's update): quarantine its
        requests, or end them (freeing their blocks and slots) and return those ended; re-raise `e` when the
        failure cannot be pinned on the step's requests."""
        self.consecutive += 1
        if not self.attributable or self.consecutive >= MAX_CONSECUTIVE:
            raise e
        requests = list({c.request.request_id: c.request for c in plan.chunks}.values())
        oom = is_out_of_memory(e)
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()
        trace = "".join(traceback.format_exception(e))
        if not applied and len(requests) > 1:
            scheduler.quarantine(requests)
            self.failed.append(FailedStep([r.request_id for r in requests], None, trace))
            return []
        for r in requests:
            scheduler.abort(r.request_id)  # False for one update() already finished: it is ended all the same
        if applied:
            scheduler.reset_prefix_cache()
        error = StepError(out_of_memory=oom, message=(
            "out of memory in the engine step this request was part of; retry, or send a shorter request"
            if oom else f"the engine step this request was part of failed ({type(e).__name__}); see the server log"))
        self.failed.append(FailedStep([r.request_id for r in requests], error, trace))
        return requests

    def ended_alone(self, request_id: str, e: Exception) -> StepError:
        """One request of an applied step failed on its own part of the update (its grammar refused its
        tokens): the engine ends it alone; the step stands for the others."""
        error = StepError(out_of_memory=is_out_of_memory(e), message=f"{type(e).__name__}: {e}")
        self.failed.append(FailedStep([request_id], error, "".join(traceback.format_exception(e))))
        return error

    def drafting_failed(self, request_ids: list[str], e: Exception) -> None:
        """MTP drafting after the update raised: the step's tokens stand, its drafts are dropped (proposals
        only: the requests decode without them). A device that is really broken fails the next forward."""
        self.failed.append(FailedStep(request_ids, None, "".join(traceback.format_exception(e)), drafts_only=True))

    def take(self) -> list[FailedStep]:
        failed, self.failed = self.failed, []
        return failed
