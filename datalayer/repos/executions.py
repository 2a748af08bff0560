"""Executions, node executions, snapshots and the work queue (``queries/executions.sql``).

Who runs what:

* **Tenant sessions** (``dl.session(ctx)``): enqueue, get, list, cancel, retry, resume,
  timeline, tree, snapshots. Every member reads; writers (owner, admin, member) write.
* **Workers** (``dl.system()``: the maintenance role, all tenants): claim, heartbeat,
  finish, wait, release, reap, recover, checkpoint, node start/finish. A worker may also run
  in a writer's tenant session, and then serves that organization only (RLS).
  :class:`datalayer.queue.Worker` wraps the loop (LISTEN/NOTIFY wake-ups, heartbeats,
  reaping).

Methods that address one execution take ``org_id``: leave it None in a tenant session (the
context's organization), pass the execution's organization from ``dl.system()``.

The state machine lives in SQL (``schema/0008_executions.sql``): an illegal transition,
from any caller and any statement, raises ``ValidationError`` naming both states, and every
transition is recorded (:class:`Transition`). Worker writes are fenced by ``(worker_id,
attempt)``: once a lease has expired and the execution went to another worker, the old
worker's finish returns None and its node or snapshot writes raise :class:`LeaseLost`.

Retries: :meth:`Executions.retry` re-runs a failed, timed-out or cancelled execution as a new
execution (``attempt + 1``, ``retry_of``), refused past ``max_attempts``. A workflow enables
*automatic* retry in its settings::

    {"retry": {"enabled": true, "max_attempts": 5, "base_delay_ms": 1000}}

(read from the version the execution runs, at enqueue). A failed or timed-out execution of
such a workflow is then retried by the database itself after ``base_delay_ms * 2^(attempt-1)``
(capped at an hour) with equal jitter. Without it ``max_attempts`` is 3 unless given: the
attempts a crashed worker's execution gets (the reaper requeues it in place as the next
attempt) and the manual retries allowed.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from datalayer.core.errors import NotFound, ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import LAST, Page, Repository, check_limit, page_of

__all__ = [
    "ACTIVE",
    "FINISHED",
    "NODE_STATUSES",
    "STATUSES",
    "TRIGGERS",
    "Execution",
    "Executions",
    "Finished",
    "Lease",
    "LeaseLost",
    "NodeExecution",
    "Recovery",
    "Snapshot",
    "TimelineEntry",
    "Transition",
    "TreeNode",
]

STATUSES = ("queued", "running", "waiting", "succeeded", "failed", "cancelled", "timed_out")
ACTIVE = ("queued", "running", "waiting")
FINISHED = ("succeeded", "failed", "cancelled", "timed_out")
TRIGGERS = ("manual", "webhook", "schedule", "sub_workflow")
NODE_STATUSES = ("succeeded", "failed", "skipped", "cancelled")
MAX_LEASE_S = 3600.0


class LeaseLost(NotFound):
    """The worker no longer holds the execution: its lease expired and it was requeued or
    taken by another worker, or it was cancelled or finished. Stop working on it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Execution:
    org_id: uuid.UUID
    id: uuid.UUID
    workflow_id: uuid.UUID
    workflow_version: int
    trigger: str
    trigger_payload: Any
    input: Any
    output: Any | None
    error: Any | None
    status: str
    status_reason: str | None
    priority: int
    attempt: int
    max_attempts: int
    auto_retry: bool
    retry_delay_ms: int
    retry_of: uuid.UUID | None
    parent_execution_id: uuid.UUID | None
    root_execution_id: uuid.UUID
    scheduled_at: datetime
    timeout_ms: int | None
    deadline_at: datetime | None
    worker_id: str | None
    lease_expires_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int | None
    created_by: uuid.UUID | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    """An execution a worker holds (heartbeat) or gave back (release)."""

    org_id: uuid.UUID
    id: uuid.UUID
    attempt: int
    lease_expires_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Finished:
    org_id: uuid.UUID
    id: uuid.UUID
    attempt: int
    finished_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeExecution:
    org_id: uuid.UUID
    id: uuid.UUID
    execution_id: uuid.UUID
    node_id: str
    node_name: str
    node_type: str
    status: str
    input: Any | None
    output: Any | None
    error: Any | None
    attempt: int
    started_at: datetime
    finished_at: datetime | None
    duration_ms: int | None
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition:
    """One change of status: who (actor_id: the context user; worker_id), what, when."""

    org_id: uuid.UUID
    execution_id: uuid.UUID
    id: int
    from_status: str | None
    to_status: str
    attempt: int
    worker_id: str | None
    actor_id: uuid.UUID | None
    reason: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    org_id: uuid.UUID
    execution_id: uuid.UUID
    seq: int
    attempt: int
    state: Any
    reason: str
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class TimelineEntry:
    """A line of a timeline: ``kind`` 'execution' (the first line: the execution now),
    'transition' (status, from_status, who, reason) or 'node' (node fields, duration)."""

    kind: str | None
    at: datetime | None
    status: str | None
    from_status: str | None
    attempt: int | None
    node_execution_id: uuid.UUID | None
    node_id: str | None
    node_name: str | None
    node_type: str | None
    worker_id: str | None
    actor_id: uuid.UUID | None
    reason: str | None
    finished_at: datetime | None
    duration_ms: int | None
    error: Any | None


@dataclass(frozen=True, slots=True, kw_only=True)
class TreeNode:
    org_id: uuid.UUID | None
    id: uuid.UUID | None
    parent_execution_id: uuid.UUID | None
    workflow_id: uuid.UUID | None
    trigger: str | None
    status: str | None
    attempt: int | None
    depth: int | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int | None
    created_at: datetime | None


@dataclass(frozen=True, slots=True)
class Recovery:
    """A recovered execution (queued again) and the snapshot its next attempt resumes from."""

    execution: Execution
    snapshot: Snapshot | None


ENQUEUE = RowQuery("executions.enqueue", Execution)
ENQUEUE_CHILD = RowQuery("executions.enqueue_child", Execution)
GET = RowQuery("executions.get", Execution)
LIST = RowQuery("executions.list", Execution)
LIST_BY_WORKFLOW = RowQuery("executions.list_by_workflow", Execution)
CANCEL = RowQuery("executions.cancel", Execution)
RETRY = RowQuery("executions.retry", Execution)
RESUME = RowQuery("executions.resume", Execution)
CLAIM = RowQuery("executions.claim", Execution)
HEARTBEAT = RowQuery("executions.heartbeat", Lease)
FINISH = RowQuery("executions.finish", Execution)
COMPLETE_MANY = RowQuery("executions.complete_many", Finished)
WAIT = RowQuery("executions.wait", Execution)
RELEASE = RowQuery("executions.release", Lease)
REAP = RowQuery("executions.reap", Execution)
RECOVER = RowQuery("executions.recover", Execution)
CHECKPOINT = RowQuery("executions.checkpoint", Snapshot)
LATEST_SNAPSHOT = RowQuery("executions.latest_snapshot", Snapshot)
START_NODE = RowQuery("executions.start_node", NodeExecution)
FINISH_NODE = RowQuery("executions.finish_node", NodeExecution)
NODES = RowQuery("executions.nodes", NodeExecution)
TRANSITIONS = RowQuery("executions.transitions", Transition)
TIMELINE = RowQuery("executions.timeline", TimelineEntry)
TREE = RowQuery("executions.tree", TreeNode)


def check_worker_id(worker_id: str) -> str:
    if not isinstance(worker_id, str) or not 1 <= len(worker_id) <= 200:
        raise ValidationError("worker_id must be a string of 1-200 characters")
    return worker_id


def check_lease(lease_s: float) -> float:
    if not 0 < lease_s <= MAX_LEASE_S:
        raise ValidationError(f"lease must be more than 0 and at most {MAX_LEASE_S:g} seconds")
    return float(lease_s)


def _error(error: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """Errors are stored as objects: a message becomes ``{"message": ...}``."""
    if error is None or isinstance(error, dict):
        return error
    return {"message": str(error)}


class Executions(Repository):
    """``db.executions``: see the module docstring for which session runs which method."""

    __slots__ = ()

    # -- tenant-facing ----------------------------------------------------------------------
    async def enqueue(self, workflow_id: uuid.UUID, *, input: Any = None,
                      trigger: str = "manual", trigger_payload: dict[str, Any] | None = None,
                      priority: int = 0, scheduled_at: datetime | None = None,
                      timeout_s: float | None = None, max_attempts: int | None = None,
                      version: int | None = None, org_id: uuid.UUID | None = None,
                      ) -> Execution:
        """Queue a run of ``workflow_id`` (its current version, or ``version``); due at once
        or at ``scheduled_at``. Higher ``priority`` runs first. ``NotFound`` when the
        workflow (or that version) does not exist or the context cannot see it."""
        if trigger not in TRIGGERS or trigger == "sub_workflow":
            raise ValidationError("trigger must be one of manual, webhook, schedule "
                                  "(sub-workflows: enqueue_child)")
        row = await self._db.fetch_one(
            ENQUEUE, workflow_id=workflow_id, input=input, trigger=trigger,
            trigger_payload=trigger_payload, priority=priority, scheduled_at=scheduled_at,
            timeout_ms=_timeout_ms(timeout_s), max_attempts=max_attempts, version=version,
            org_id=org_id)
        if row is None:
            raise NotFound("workflow not found (or that version does not exist)",
                           query=ENQUEUE.name)
        return row

    async def enqueue_child(self, parent: Execution, workflow_id: uuid.UUID, *,
                            node_id: str, input: Any = None,
                            timeout_s: float | None = None) -> Execution:
        """Start a sub-workflow from node ``node_id`` of a running or waiting ``parent``:
        same organization and priority, ``trigger='sub_workflow'``, in the parent's tree."""
        row = await self._db.fetch_one(
            ENQUEUE_CHILD, parent_id=parent.id, org_id=parent.org_id, workflow_id=workflow_id,
            node_id=node_id, input=input, timeout_ms=_timeout_ms(timeout_s))
        if row is None:
            raise NotFound("parent execution not running or waiting, or workflow not found",
                           query=ENQUEUE_CHILD.name)
        return row

    async def get(self, execution_id: uuid.UUID, *,
                  org_id: uuid.UUID | None = None) -> Execution | None:
        return await self._db.fetch_one(GET, id=execution_id, org_id=org_id)

    async def list(self, *, workflow_id: uuid.UUID | None = None,
                   statuses: Sequence[str] = STATUSES,
                   before: tuple[datetime, uuid.UUID] | None = None,
                   limit: int = 100) -> Page[Execution]:
        """The organization's executions (of one workflow), newest first; pass the page's
        ``next`` as ``before`` for the following page."""
        bad = set(statuses) - set(STATUSES)
        if bad or not statuses:
            raise ValidationError(f"statuses must be some of {', '.join(STATUSES)}")
        created, eid = before or LAST
        common: dict[str, object] = {"statuses": list(statuses), "before_created_at": created,
                                     "before_id": eid, "limit": check_limit(limit)}
        if workflow_id is None:
            rows = await self._db.fetch_many(LIST, **common)
        else:
            rows = await self._db.fetch_many(LIST_BY_WORKFLOW, workflow_id=workflow_id,
                                             **common)
        return page_of(rows, limit, lambda e: (e.created_at, e.id))

    async def cancel(self, execution_id: uuid.UUID, *, reason: str = "cancelled",
                     org_id: uuid.UUID | None = None) -> Execution:
        """Cancel a queued, running or waiting execution (a running one's worker finds out at
        its next heartbeat or write). ``ValidationError`` when it already finished,
        ``NotFound`` when it is not there or the context may not write."""
        row = await self._db.fetch_one(CANCEL, id=execution_id, reason=reason, org_id=org_id)
        if row is None:
            raise NotFound("execution not found or not writable by this role",
                           query=CANCEL.name)
        return row

    async def retry(self, execution_id: uuid.UUID, *,
                    org_id: uuid.UUID | None = None) -> Execution:
        """Run a failed, timed-out or cancelled execution again as a new attempt linked to it.

        ``ValidationError`` past ``max_attempts`` or in another state, ``Conflict`` when this
        attempt was retried already (by hand or automatically), ``NotFound`` when absent."""
        row = await self._db.fetch_one(RETRY, id=execution_id, org_id=org_id)
        if row is not None:
            return row
        old = await self.get(execution_id, org_id=org_id)
        if old is None:
            raise NotFound("execution not found", query=RETRY.name)
        if old.status not in ("failed", "timed_out", "cancelled"):
            raise ValidationError(f"only a failed, timed-out or cancelled execution can be "
                                  f"retried; this one is {old.status}", query=RETRY.name)
        if old.attempt >= old.max_attempts:
            raise ValidationError(f"the execution has used all {old.max_attempts} of its "
                                  f"attempts", query=RETRY.name)
        raise NotFound("execution not writable by this role", query=RETRY.name)

    async def resume(self, execution_id: uuid.UUID, *, reason: str = "resumed",
                     org_id: uuid.UUID | None = None) -> Execution:
        """A waiting execution's event arrived: queue it again (same attempt)."""
        row = await self._db.fetch_one(RESUME, id=execution_id, reason=reason, org_id=org_id)
        if row is not None:
            return row
        old = await self.get(execution_id, org_id=org_id)
        if old is None:
            raise NotFound("execution not found", query=RESUME.name)
        raise ValidationError(f"only a waiting execution can be resumed; this one is "
                              f"{old.status}", query=RESUME.name)

    async def timeline(self, execution_id: uuid.UUID, *,
                       org_id: uuid.UUID | None = None) -> builtins.list[TimelineEntry]:
        """The execution (first entry), its transitions and node executions in time order,
        in one round trip; empty when it is not there."""
        return await self._db.fetch_many(TIMELINE, execution_id=execution_id, org_id=org_id)

    async def tree(self, root_id: uuid.UUID, *,
                   org_id: uuid.UUID | None = None) -> builtins.list[TreeNode]:
        """The sub-workflow tree under ``root_id`` (depth 0), depth first."""
        return await self._db.fetch_many(TREE, root_id=root_id, org_id=org_id)

    async def transitions(self, execution_id: uuid.UUID, *,
                          org_id: uuid.UUID | None = None) -> builtins.list[Transition]:
        return await self._db.fetch_many(TRANSITIONS, execution_id=execution_id, org_id=org_id)

    async def nodes(self, execution_id: uuid.UUID, *,
                    org_id: uuid.UUID | None = None) -> builtins.list[NodeExecution]:
        return await self._db.fetch_many(NODES, execution_id=execution_id, org_id=org_id)

    async def latest_snapshot(self, execution_id: uuid.UUID, *,
                              org_id: uuid.UUID | None = None) -> Snapshot | None:
        return await self._db.fetch_one(LATEST_SNAPSHOT, execution_id=execution_id,
                                        org_id=org_id)

    # -- workers ----------------------------------------------------------------------------
    async def claim(self, worker_id: str, *, limit: int = 10,
                    lease_s: float = 30.0) -> builtins.list[Execution]:
        """Up to ``limit`` due queued executions, now running on ``worker_id`` for
        ``lease_s`` seconds (renew with :meth:`heartbeat`). One statement; concurrent
        claimers never receive the same execution."""
        return await self._db.fetch_many(CLAIM, worker_id=check_worker_id(worker_id),
                                         limit=check_limit(limit), lease_s=check_lease(lease_s))

    async def heartbeat(self, worker_id: str, *,
                        lease_s: float = 30.0) -> builtins.list[Lease]:
        """Renew the leases of everything ``worker_id`` holds; returns what it still holds
        (anything missing was reaped, cancelled or finished: drop it)."""
        return await self._db.fetch_many(HEARTBEAT, worker_id=check_worker_id(worker_id),
                                         lease_s=check_lease(lease_s))

    async def complete(self, execution: Execution, *, output: Any = None) -> Execution | None:
        """Finish a claimed execution as succeeded; None when the worker no longer holds it."""
        return await self.finish(execution, "succeeded", output=output)

    async def fail(self, execution: Execution, *, error: str | dict[str, Any],
                   reason: str | None = None) -> Execution | None:
        """Finish a claimed execution as failed (its workflow may retry it automatically);
        None when the worker no longer holds it."""
        return await self.finish(execution, "failed", error=error, reason=reason)

    async def finish(self, execution: Execution, status: str, *, output: Any = None,
                     error: str | dict[str, Any] | None = None,
                     reason: str | None = None) -> Execution | None:
        """Finish a claimed execution as ``status`` (succeeded, failed, cancelled,
        timed_out); None when the worker no longer holds it."""
        if status not in FINISHED:
            raise ValidationError(f"status must be one of {', '.join(FINISHED)}")
        return await self._db.fetch_one(
            FINISH, org_id=execution.org_id, id=execution.id, worker_id=_holder(execution),
            attempt=execution.attempt, status=status, output=output, error=_error(error),
            reason=reason)

    async def complete_many(self, worker_id: str, executions: Sequence[Execution],
                            outputs: Sequence[Any] | None = None) -> builtins.list[Finished]:
        """Complete a batch as succeeded in one statement; returns those completed (the ones
        ``worker_id`` still held)."""
        if outputs is not None and len(outputs) != len(executions):
            raise ValidationError("outputs must have one entry per execution")
        return await self._db.fetch_many(
            COMPLETE_MANY, worker_id=check_worker_id(worker_id),
            org_ids=[e.org_id for e in executions], ids=[e.id for e in executions],
            attempts=[e.attempt for e in executions],
            outputs=list(outputs) if outputs is not None else [None] * len(executions))

    async def wait(self, execution: Execution, *, reason: str) -> Execution | None:
        """Pause a claimed execution until :meth:`resume` (its lease is released); None
        when the worker no longer holds it. Checkpoint first to resume from its state."""
        return await self._db.fetch_one(WAIT, org_id=execution.org_id, id=execution.id,
                                        worker_id=_holder(execution),
                                        attempt=execution.attempt, reason=reason)

    async def release(self, worker_id: str) -> builtins.list[Lease]:
        """Give back everything ``worker_id`` holds (clean shutdown), queued again at once."""
        return await self._db.fetch_many(RELEASE, worker_id=check_worker_id(worker_id))

    async def reap(self, *, limit: int = 100) -> builtins.list[Execution]:
        """Requeue (as the next attempt) or fail (after the last) up to ``limit`` executions
        whose lease expired, and time out those past their deadline."""
        return await self._db.fetch_many(REAP, limit=check_limit(limit))

    async def recover(self, execution_id: uuid.UUID, *,
                      org_id: uuid.UUID | None = None) -> Recovery:
        """Requeue a crashed execution (running, lease expired, attempts left) now, as its
        next attempt, and return the snapshot that attempt resumes from. Two round trips.
        ``ValidationError`` when it is not crashed (or out of attempts)."""
        row = await self._db.fetch_one(RECOVER, id=execution_id, org_id=org_id)
        if row is None:
            old = await self.get(execution_id, org_id=org_id)
            if old is None:
                raise NotFound("execution not found", query=RECOVER.name)
            raise ValidationError(
                f"only a running execution whose lease expired and that has attempts left "
                f"can be recovered; this one is {old.status}, attempt {old.attempt} of "
                f"{old.max_attempts}", query=RECOVER.name)
        return Recovery(row, await self.latest_snapshot(row.id, org_id=row.org_id))

    async def checkpoint(self, execution: Execution, state: Any, *, reason: str = "",
                         seq: int | None = None) -> Snapshot:
        """Snapshot the state of a claimed execution (``seq``: the next number unless
        given; ``Conflict`` if taken). :class:`LeaseLost` when no longer held."""
        row = await self._db.fetch_one(
            CHECKPOINT, org_id=execution.org_id, id=execution.id, worker_id=_holder(execution),
            attempt=execution.attempt, state=state, reason=reason, seq=seq)
        if row is None:
            raise LeaseLost("execution no longer held by this worker", query=CHECKPOINT.name)
        return row

    async def start_node(self, execution: Execution, node_id: str, *, name: str = "",
                         type: str = "", input: Any = None, attempt: int = 1) -> NodeExecution:
        """A node of a claimed execution starts. :class:`LeaseLost` when no longer held."""
        row = await self._db.fetch_one(
            START_NODE, org_id=execution.org_id, execution_id=execution.id,
            worker_id=_holder(execution), attempt=execution.attempt, node_id=node_id,
            node_name=name, node_type=type, input=input, node_attempt=attempt)
        if row is None:
            raise LeaseLost("execution no longer held by this worker", query=START_NODE.name)
        return row

    async def finish_node(self, execution: Execution, node: NodeExecution, *,
                          status: str = "succeeded", output: Any = None,
                          error: str | dict[str, Any] | None = None) -> NodeExecution:
        """A running node finishes as ``status``. :class:`LeaseLost` when the execution is
        no longer held, ``ValidationError`` when the node already finished."""
        if status not in NODE_STATUSES:
            raise ValidationError(f"status must be one of {', '.join(NODE_STATUSES)}")
        row = await self._db.fetch_one(
            FINISH_NODE, org_id=node.org_id, id=node.id, created_at=node.created_at,
            worker_id=_holder(execution), attempt=execution.attempt, status=status,
            output=output, error=_error(error))
        if row is None:
            if node.status != "running":
                raise ValidationError("the node already finished", query=FINISH_NODE.name)
            raise LeaseLost("execution no longer held by this worker (or the node finished)",
                            query=FINISH_NODE.name)
        return row


def _holder(execution: Execution) -> str:
    if execution.worker_id is None:
        raise ValidationError("pass the execution as claimed (it carries the worker id)")
    return execution.worker_id


def _timeout_ms(timeout_s: float | None) -> int | None:
    if timeout_s is None:
        return None
    if not 0 < timeout_s <= 30 * 86_400:
        raise ValidationError("timeout must be more than 0 seconds and at most 30 days")
    return max(1, round(timeout_s * 1000))
