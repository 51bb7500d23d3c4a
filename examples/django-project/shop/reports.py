"""Django 6 only: tasks of Django's own Tasks framework (django.tasks), run by dbtask workers
through the TASKS backend in the settings. Not a `tasks` module, so the worker imports it
when told: `dbtask-worker --django djproject.settings -A shop.reports`."""

from django.tasks import task

from .models import Order


@task
def count_orders(item: str) -> int:
    return Order.objects.filter(item=item).count()


@task(priority=50, queue_name="reports", takes_context=True)
def order_summary(context, item: str) -> dict:
    # context: django.tasks.TaskContext; task_result.id is the dbtask task id.
    return {
        "item": item,
        "orders": Order.objects.filter(item=item).count(),
        "attempt": context.attempt,
        "task_id": context.task_result.id,
    }


@task
async def shout(text: str) -> str:
    return text.upper()


@task
def fail(message: str) -> None:
    raise ValueError(message)
