"""The shop's dbtask tasks: `dbtask-worker --django djproject.settings` finds this module
because shop is an installed app (no -A needed)."""

import dbtask

from .models import Order


@dbtask.task
def ship_order(order_id: int) -> dict:
    # Runs on the worker, with the project's models and database.
    order = Order.objects.get(pk=order_id)
    order.shipped = True
    order.save(update_fields=["shipped"])
    return {"order": order.id, "item": order.item, "shipped": True}
