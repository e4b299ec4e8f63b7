"""The streamem page on the Dask dashboard: ``/streamem`` on the scheduler's HTTP server.

How it is wired, with distributed's own extension points:

- The DRIVER publishes: after each iteration the run loop calls :func:`publish_iteration`,
  which sends :func:`streamem.dist.dashboard_payload.iteration_payload` (a few tens of
  kB of numbers and PNGs) to the scheduler's event log, topic ``streamem``
  (``Client.log_event``). Without a client (threads, ``--no-cluster``) it does nothing;
  a failure to publish is logged and never stops the run.
- The SCHEDULER serves: :class:`~streamem.dist.dashboard_server.DashboardPlugin`, a
  ``SchedulerPlugin`` registered by :func:`announce_page` wherever streamem starts or
  connects a cluster (:func:`streamem.dist.cluster.client_for`; idempotent, so a
  second job on the same scheduler registers nothing new), adds three tornado handlers
  to the scheduler's HTTP application (``Scheduler.http_application``, the dashboard's
  server): ``/streamem`` (the page, :func:`streamem.dist.dashboard_page.render_page`),
  ``/streamem/fragment`` (its body, re-fetched by the page every 2 s) and
  ``/streamem/state.json``. They read the run's messages from the event log
  (``Scheduler.get_events``), so a page opened late shows the whole run, and the plugin
  counts the E-step's chunk tasks itself, from the scheduler's task transitions
  (``SchedulerPlugin.transition``): keys ``"{job}-estep-itNNN-{start}-{token}"``
  (:func:`streamem.em.engine.run_estep`) seen and finished (state ``memory``; a chunk
  recomputed after a lost worker counts once). The log keeps up to 1000 messages a
  topic (``distributed.admin.low-level-log-length``); the plugin empties the images of
  every message but the newest (the page shows only those), so a long class3d run costs
  the scheduler kilobytes per iteration, not the ~1 MB of its images.

A remote scheduler (``--scheduler``) needs streamem importable in ITS environment:
the plugin is unpickled and runs there. Without it the job runs as before and logs one
warning that the page is missing. The page is served wherever the dashboard is (plain
HTTP on 127.0.0.1 for the clusters streamem starts); it assumes the dashboard's default
HTTP prefix ``/``. With several runs on one scheduler the page shows the newest.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from streamem.dist.dashboard_page import PAGE_PATH, TOPIC

log = logging.getLogger("streamem")


# -- the driver's side ---------------------------------------------------------------------


def page_link(client) -> str | None:
    """The page's URL next to ``client.dashboard_link`` (``.../status`` -> ``.../streamem``)."""
    link = getattr(client, "dashboard_link", None)
    if not link:
        return None
    parts = urlsplit(link)
    return urlunsplit((parts.scheme, parts.netloc, PAGE_PATH, "", ""))


def announce_page(client) -> bool:
    """Register :class:`~streamem.dist.dashboard_server.DashboardPlugin` on ``client``'s
    scheduler (idempotent) and log the page's link; False (and one warning) when the
    scheduler cannot run it (streamem not importable there)."""
    from streamem.dist.dashboard_server import DashboardPlugin

    try:
        client.register_plugin(DashboardPlugin())
    except Exception as exc:  # remote scheduler without streamem, plugins not allowed
        log.warning(
            "no streamem dashboard page: the scheduler could not load its plugin "
            "(install streamem in the scheduler's environment): %s",
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return False
    link = page_link(client)
    if link:
        log.info("streamem page %s", link)
    return True


def publish_iteration(client, job_kind: str, **facts: Any) -> None:
    """Send one finished iteration to the page (nothing without a client).

    facts: :func:`streamem.dist.dashboard_payload.iteration_payload`'s keywords (ctx,
    iteration, state, model, stats, phase_seconds, changed, seconds). A failure is
    logged, never raised: the page is a view, the run goes on.
    """
    if client is None:
        return
    try:
        from streamem.dist.dashboard_payload import iteration_payload

        client.log_event(TOPIC, iteration_payload(job_kind, **facts))
    except Exception as exc:
        log.warning("streamem page: iteration not published (%s: %s)", type(exc).__name__, exc)
