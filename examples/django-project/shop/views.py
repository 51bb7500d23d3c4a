import json

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from .models import Order
from .tasks import ship_order


@csrf_exempt
@require_POST
def place_order(request: HttpRequest) -> JsonResponse:
    body = json.loads(request.body or b"{}")
    with transaction.atomic():
        order = Order.objects.create(item=str(body.get("item", "")), quantity=int(body.get("quantity", 1)))
        # Sent once the order is committed: the worker never looks for an order that is not
        # there yet, and a rolled-back order ships nothing.
        ship_order.delay_on_commit(order.id)
    return JsonResponse({"order": order.id}, status=201)


@require_GET
def order_status(request: HttpRequest, order_id: int) -> JsonResponse:
    order = Order.objects.get(pk=order_id)
    return JsonResponse({"order": order.id, "item": order.item, "shipped": order.shipped})
