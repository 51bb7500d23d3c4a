from django.db import models


class Order(models.Model):
    item = models.CharField(max_length=100)
    quantity = models.PositiveIntegerField()
    # Set by the task ship_order, run by a dbtask worker.
    shipped = models.BooleanField(default=False)
