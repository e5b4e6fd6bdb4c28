"""mqkit's own middlewares for metrics and traces (each needs its extra).

- :class:`PrometheusMiddleware` (``pip install 'mqkit[prometheus]'``): counters, gauges and
  histograms of what the clients publish and handle, in a ``prometheus_client`` registry.
- :class:`TracingMiddleware` (``pip install 'mqkit[otel]'``): OpenTelemetry spans per publish
  and per handled delivery, with the W3C ``traceparent`` carried in the message headers.

```python
from mqkit.observability import PrometheusMiddleware, TracingMiddleware

client = mqkit.Client(service="billing", middleware=[PrometheusMiddleware(), TracingMiddleware()])
```

Both are plain :class:`mqkit.Middleware` objects that serve ``Client`` and ``AsyncClient``
alike; each is imported only when asked for, so the other's extra need not be installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mqkit.observability.prometheus import PrometheusMiddleware
    from mqkit.observability.tracing import TracingMiddleware

__all__ = ["PrometheusMiddleware", "TracingMiddleware"]


def __getattr__(name: str) -> Any:
    if name == "PrometheusMiddleware":
        from mqkit.observability.prometheus import PrometheusMiddleware

        return PrometheusMiddleware
    if name == "TracingMiddleware":
        from mqkit.observability.tracing import TracingMiddleware

        return TracingMiddleware
    raise AttributeError(f"module 'mqkit.observability' has no attribute {name!r}")
