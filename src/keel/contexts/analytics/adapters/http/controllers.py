"""Thin controllers for analytics: the cached summary, and on-demand rollups."""

from __future__ import annotations

from datetime import date
from typing import Annotated

from litestar import Controller, Response, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, QueryParameter

from keel.contexts.analytics.adapters.http.schemas import RollupAccepted, RollupIn, SummaryOut
from keel.contexts.analytics.domain.model import DEFAULT_SUMMARY_DAYS, MAX_ROLLUP_DAYS, MAX_SUMMARY_DAYS
from keel.contexts.analytics.domain.services import AnalyticsService
from keel.platform.adapters.http.auth import BEARER_AUTH, Authenticated
from keel.platform.adapters.http.jobs import accepted_as, job_status_url
from keel.platform.adapters.http.problems import problem_responses
from keel.platform.adapters.http.schemas import whole

Analytics = NamedDependency[AnalyticsService]
_AUTH = (400, 401, 422, 429)

From = Annotated[
    date | None,
    QueryParameter(
        name="from", description=f"First day (UTC), inclusive. Default: {DEFAULT_SUMMARY_DAYS} days up to `to`."
    ),
]
To = Annotated[date | None, QueryParameter(name="to", description="Last day (UTC), inclusive. Default: today.")]
Currency = Annotated[
    str | None,
    QueryParameter(
        pattern=whole("[A-Za-z]{3}"),
        description="Narrow payments and refunds to one ISO 4217 currency; other figures are unaffected.",
    ),
]


class AnalyticsController(Controller):
    path = "/v1/analytics"
    tags = ["analytics"]
    security = BEARER_AUTH

    @get(
        "/summary",
        summary="Daily figures and totals for a date range",
        description=(
            "Payments and refunds (by currency and current status), new users and API requests served, per UTC "
            f"day and in total, for at most {MAX_SUMMARY_DAYS} days. Closed days come from rollups (`rolled_up`); "
            "today, and days no rollup has covered, are computed live. Cached, and invalidated by the events "
            "that change the figures; API requests are counted about once a minute."
        ),
        responses=problem_responses(*_AUTH),
    )
    async def summary(
        self,
        analytics: Analytics,
        request: Authenticated,
        start: From = None,
        end: To = None,
        currency: Currency = None,
    ) -> SummaryOut:
        return SummaryOut.of(await analytics.summary(request.user, start, end, currency))

    @post(
        "/rollups",
        status_code=202,
        summary="Recompute the rollups of a range of closed days",
        description=(
            f"Recomputes each day from `from` to `to` (inclusive, before today, at most {MAX_ROLLUP_DAYS} days) in "
            "a job and replaces its stored figures; running it twice gives the same figures. Rollups also run "
            "nightly, and again shortly after any late change to a closed day."
        ),
        responses=problem_responses(*_AUTH, 413, 415, 503),
    )
    async def request_rollup(
        self, data: JSONBody[RollupIn], analytics: Analytics, request: Authenticated
    ) -> Response[RollupAccepted]:
        job_id = await analytics.request_rollup(request.user, data.start, data.end)
        body = RollupAccepted(job_id=job_id, status_url=job_status_url(job_id), start=data.start, end=data.end)
        return accepted_as(body, job_id)


ROUTES = [AnalyticsController]
