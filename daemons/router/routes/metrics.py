"""GET /metrics in Prometheus' text format (any principal may read it: it names models
and principal classes, never principals)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from daemons.router.state import RouterState, get_state

router = APIRouter()


@router.get("/metrics")
async def metrics(state: RouterState = Depends(get_state)) -> Response:
    m = state.metrics
    for name, q in state.dispatch.queues.items():
        m.queue_depth.labels(name).set(q.queued)
        m.in_flight.labels(name).set(q.in_flight)
    m.ledger_pending.set(state.ledger.pending())
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)
