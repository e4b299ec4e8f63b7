"""The scheduler's side of the streamem page: the plugin and its tornado handlers.

:class:`DashboardPlugin` is what :func:`streamem.dist.dashboard.announce_page` registers
(the wiring is described in :mod:`streamem.dist.dashboard`); it lives apart so that the
run loop, which imports :mod:`streamem.dist.dashboard` to publish, does not import
distributed's scheduler side and tornado.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web

from streamem.dist import dashboard_page
from streamem.dist.dashboard_page import PAGE_PATH, TOPIC

#: The scheduler plugin's name (one per scheduler).
PLUGIN_NAME = "streamem-dashboard"
#: A chunk task of an E-step: job, iteration.
_CHUNK_KEY = re.compile(r"^(refine3d|class3d|class2d)-estep-it(\d+)-\d+-[0-9a-f]+$")
#: E-steps whose chunk counts the plugin keeps.
_KEPT_ESTEPS = 4


class DashboardPlugin(SchedulerPlugin):
    """Serves the streamem page from the scheduler (module docstring)."""

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self) -> None:
        self.scheduler = None
        # (job, iteration) -> {"seen": set of keys, "done": set, "erred": set}
        self.esteps: OrderedDict[tuple[str, int], dict[str, set]] = OrderedDict()
        self.with_images: dict | None = None  # the one message that keeps its images

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        app = getattr(scheduler, "http_application", None)
        if app is None:  # a scheduler without an HTTP server
            return
        page = {"plugin": self}
        app.add_handlers(
            r".*$",
            [
                (PAGE_PATH + "/?", PageHandler, page),
                (PAGE_PATH + "/fragment", FragmentHandler, page),
                (PAGE_PATH + "/state.json", StateHandler, page),
            ],
        )

    def log_event(self, topic: str, msg) -> None:
        """Keep images (the largest part, up to ~1 MB for class3d at box 128) only in the
        newest message: the event log holds up to ``distributed.admin.low-level-log-length``
        (1000) messages a topic, and the page shows only the newest images."""
        if topic != TOPIC or not isinstance(msg, dict) or "images" not in msg:
            return
        previous, self.with_images = self.with_images, msg
        if previous is not None and previous is not msg:
            previous["images"], previous["angdist"] = [], None

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if not isinstance(key, str):
            return
        match = _CHUNK_KEY.match(key)
        if match is None:
            return
        estep = (match.group(1), int(match.group(2)))
        counts = self.esteps.get(estep)
        if counts is None:
            counts = self.esteps[estep] = {"seen": set(), "done": set(), "erred": set()}
            while len(self.esteps) > _KEPT_ESTEPS:
                self.esteps.popitem(last=False)
        counts["seen"].add(key)
        if finish == "memory":
            counts["done"].add(key)
            counts["erred"].discard(key)
        elif finish == "erred":
            counts["erred"].add(key)

    def progress(self) -> dict | None:
        """Chunks done/total of the newest E-step seen: {"job", "iteration", "done",
        "total", "erred"}, or None."""
        if not self.esteps:
            return None
        (job, iteration), counts = next(reversed(self.esteps.items()))
        return {
            "job": job,
            "iteration": iteration,
            "done": len(counts["done"]),
            "total": len(counts["seen"]),
            "erred": len(counts["erred"]),
        }

    def state(self) -> dict:
        """The page's state (:func:`streamem.dist.dashboard_page.page_state`)."""
        events = self.scheduler.get_events(TOPIC) if self.scheduler is not None else ()
        return dashboard_page.page_state(events, self.progress())


class _Handler(web.RequestHandler):
    def initialize(self, plugin: DashboardPlugin) -> None:
        self.plugin = plugin

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")


class PageHandler(_Handler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(dashboard_page.render_page(self.plugin.state()))


class FragmentHandler(_Handler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(dashboard_page.render_body(self.plugin.state()))


class StateHandler(_Handler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(dashboard_page.state_json(self.plugin.state()))
