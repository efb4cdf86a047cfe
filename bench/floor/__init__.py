"""The floor: the least a Django ASGI proxy can do (bearer check, AES-GCM open, httpx stream, re-emit).

CesaFlow's proxy is compared against this, served by the same server, in the same run. Nothing here is product
code: no database, no middleware, one shared httpx client, bytes re-emitted as they arrive.
"""
