"""Sandbox providers: real HTTP servers playing lemft, lunpay and kasushou.

    box = Sandbox(accounts)
    order = box.create_order("kasushou-test", status=2)
    async with serve(box.app) as url:      # an account's base_url: f"{url}/{provider}"
        ...
    box.set_status("kasushou-test", order.order_id, 3)
    body, content_type = box.callback("kasushou-test", order.order_id)

They check credentials and signatures as the providers' docs say, keep each order's
status history, log every query, and misbehave on request (`Faults`). The bridge's
adapters are tested against them, so nothing here is imported from `bridge.providers`.
"""

from bridge.sandbox.app import Sandbox
from bridge.sandbox.book import Faults, QueryRecord, SandboxOrder

__all__ = ["Faults", "QueryRecord", "Sandbox", "SandboxOrder"]
