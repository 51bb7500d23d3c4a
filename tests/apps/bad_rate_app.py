"""A module whose task carries a rate limit the worker cannot parse (set after decoration, so
the client-side check is bypassed): the worker must refuse to start, naming the task."""

from dbtask import task


@task(name="rate.bad")
def bad() -> None:
    return None


bad.options["rate_limit"] = "5/fortnight"
